"""Draw docs/images/world_fg_ratio.png: per-layer [cls]->foreground ratio of several methods, mean and
range over seeds, from the attention_stats.json files a `mmprompt sweep` wrote (docs/analysis.md §5).

    python docs/images/plot_fg_ratio.py runs/world ZeroShot MaPLe BiasTuning
"""

import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from mmprompt.analysis.statistics import layer_means, load_summary  # noqa: E402

HERE = Path(__file__).parent


def seed_curves(sweep: Path, label: str) -> np.ndarray:
    """(seeds, layers) mean-over-heads fg_ratio of every seed run of ``label``."""
    runs = sorted(sweep.glob(f"{label}-*/seed*/attention_stats.json"))
    if not runs:
        raise FileNotFoundError(f"no {label}-*/seed*/attention_stats.json under {sweep}")
    return np.array([layer_means(load_summary(run), "vision", "fg_ratio") for run in runs])


def main(sweep: Path, labels: list[str]) -> Path:
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    for label in labels:
        curves = seed_curves(sweep, label)
        layers = np.arange(curves.shape[1])
        ax.plot(layers, curves.mean(0), marker="o", ms=3, label=f"{label} ({len(curves)} seed{'s' * (len(curves) > 1)})")
        ax.fill_between(layers, curves.min(0), curves.max(0), alpha=0.2)
    ax.axhline(1.0, color="grey", ls="--", lw=0.8, label="no preference")
    ax.set(xlabel="vision layer", ylabel="[cls]→foreground ratio", title="world-shapes test images, tiny CLIP")
    ax.legend(fontsize=8)
    fig.tight_layout()
    out = HERE / "world_fg_ratio.png"
    fig.savefig(out, dpi=110)
    return out


if __name__ == "__main__":
    print(main(Path(sys.argv[1]), sys.argv[2:]))
