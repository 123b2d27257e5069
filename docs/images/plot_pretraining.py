"""Draw docs/images/pretraining_curve.png from a `mmprompt pretrain` run's metrics.csv.

    python docs/images/plot_pretraining.py runs/pretrain-mmprompt-tiny/version_0/metrics.csv
(the shipped weights' own metrics.csv is kept next to this script)."""

import csv
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = Path(__file__).parent


def main(path: Path) -> Path:
    rows = list(csv.DictReader(path.open()))
    loss = [(int(r["step"]), float(r["train/loss"])) for r in rows if r.get("train/loss")]
    val = [(int(r["step"]), float(r["val/colour_acc"]), float(r["val/shape_acc"])) for r in rows if r.get("val/shape_acc")]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    left.plot(*zip(*loss), lw=0.8)
    left.set(xlabel="step (batch 64)", ylabel="contrastive loss", title="training loss")
    steps, colour, shape = zip(*val)
    right.plot(steps, colour, label="colour (12-way)")
    right.plot(steps, shape, label="shape (12-way)")
    right.axhline(100 / 12, color="grey", ls="--", lw=0.8, label="chance")
    right.set(xlabel="step", ylabel="zero-shot accuracy (%)", title="600 held-out images", ylim=(0, 100))
    right.legend()
    fig.tight_layout()
    out = HERE / "pretraining_curve.png"
    fig.savefig(out, dpi=110)
    return out


if __name__ == "__main__":
    print(main(Path(sys.argv[1]) if len(sys.argv) > 1 else HERE / "pretraining_metrics.csv"))
