"""PNG figures of ``mmprompt report --figures`` (matplotlib, Agg): accuracy per dataset with intervals,
[cls] fg_ratio per layer per method with intervals, accuracy against trainable-parameter budget.

Every bar, point and band is a mean with its t-interval over seeds (`mmprompt.tools.report_stats`); zero-shot
CLIP has one run and no interval. Imported only when figures are asked for: matplotlib is slow to load.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .report_claims import (  # noqa: E402
    FAMILY_LABELS, ZERO_SHOT, ClaimRun, cells_by_variant, fg_ratio_per_layer,
)
from .report_stats import Interval, t_interval  # noqa: E402


def family_label(variant: str) -> str:
    family, _, budget = variant.rpartition("_")
    if budget.isdigit():
        return f"{FAMILY_LABELS.get(family, family)} ({int(budget):,})"
    return FAMILY_LABELS.get(variant, variant)


def error_bar(interval: Interval) -> tuple[float, float]:
    """(below, above) for matplotlib; zero where no interval is defined."""
    if not interval.defined:
        return 0.0, 0.0
    return interval.mean - interval.low, interval.high - interval.mean


def variants_on_every_dataset(runs: Sequence[ClaimRun]) -> tuple[list[str], list[str]]:
    """Datasets, and the variants run on all of them (zero-shot first), in a stable order."""
    datasets = sorted({r.dataset for r in runs})
    cells = cells_by_variant(runs)
    variants = sorted({r.variant for r in runs}, key=lambda v: (v != ZERO_SHOT, v))
    return datasets, [v for v in variants if all((v, d) in cells for d in datasets)]


def accuracy_per_dataset(runs: Sequence[ClaimRun], path: Path, level: float) -> Path:
    """Grouped bars: HM per dataset for every variant run on all datasets, with its interval."""
    datasets, variants = variants_on_every_dataset(runs)
    cells = cells_by_variant(runs)
    width = 0.8 / max(len(variants), 1)
    figure, axis = plt.subplots(figsize=(max(6.0, 1.6 * len(datasets)), 3.6))
    for k, variant in enumerate(variants):
        intervals = [t_interval([r.hm for r in cells[(variant, d)]], level) for d in datasets]
        below, above = zip(*map(error_bar, intervals))
        axis.bar([i + (k - (len(variants) - 1) / 2) * width for i in range(len(datasets))],
                 [i.mean for i in intervals], width, yerr=[below, above], capsize=2, label=family_label(variant))
    axis.set_xticks(range(len(datasets)), [d.replace("world_", "") for d in datasets])
    axis.set_ylabel(f"HM of base and novel (%), {level:.0%} interval")
    axis.legend(fontsize=7, ncol=2)
    return save(figure, path)


def fg_ratio_layers(runs: Sequence[ClaimRun], path: Path, level: float) -> Path:
    """One panel per dataset: head-mean [cls] fg_ratio per vision layer, a band = the interval over seeds."""
    datasets, variants = variants_on_every_dataset(runs)
    cells = cells_by_variant(runs)
    columns = min(3, max(len(datasets), 1))
    rows = (len(datasets) + columns - 1) // columns
    figure, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.0 * rows), squeeze=False)
    for axis, dataset in zip(axes.flat, datasets):
        for variant in variants:
            layers = [v for r in cells[(variant, dataset)] if (v := fg_ratio_per_layer(r)) is not None]
            if not layers:
                continue
            intervals = [t_interval([run[j] for run in layers], level) for j in range(len(layers[0]))]
            xs = range(len(intervals))
            axis.plot(xs, [i.mean for i in intervals], marker="o", markersize=2, label=family_label(variant),
                      linestyle="--" if variant == ZERO_SHOT else "-")
            if all(i.defined for i in intervals):
                axis.fill_between(xs, [i.low for i in intervals], [i.high for i in intervals], alpha=0.2)
        axis.axhline(1.0, color="grey", linewidth=0.8)
        axis.set_title(dataset, fontsize=9)
        axis.set_xlabel("vision layer")
        axis.set_ylabel("[cls] fg_ratio")
    for axis in list(axes.flat)[len(datasets):]:
        axis.axis("off")
    axes.flat[0].legend(fontsize=7)
    return save(figure, path)


def accuracy_vs_budget(runs: Sequence[ClaimRun], path: Path, level: float) -> Path | None:
    """HM against trainable parameters (log scale) per method family, on datasets with ≥ 3 budgets."""
    budgeted = [r for r in runs if r.budget is not None]
    datasets = sorted({r.dataset for r in budgeted if len({x.budget for x in budgeted if x.dataset == r.dataset}) >= 3})
    if not datasets:
        return None
    figure, axes = plt.subplots(1, len(datasets), figsize=(5.0 * len(datasets), 3.6), squeeze=False)
    for axis, dataset in zip(axes.flat, datasets):
        here = [r for r in budgeted if r.dataset == dataset]
        for family in sorted({r.family for r in here}):
            budgets = sorted({r.budget for r in here if r.family == family})
            intervals = [t_interval([r.hm for r in here if r.family == family and r.budget == b], level)
                         for b in budgets]
            below, above = zip(*map(error_bar, intervals))
            axis.errorbar(budgets, [i.mean for i in intervals], yerr=[below, above], marker="o", capsize=3,
                          label=FAMILY_LABELS.get(family, family))
        axis.set_xscale("log")
        axis.set_xlabel("trainable parameters")
        axis.set_ylabel(f"HM (%), {level:.0%} interval")
        axis.set_title(dataset, fontsize=9)
        axis.legend(fontsize=7)
    return save(figure, path)


def save(figure, path: Path) -> Path:
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def draw_figures(runs: Sequence[ClaimRun], out: Path, level: float = 0.95) -> list[Path]:
    """The three figures into ``out`` (the budget figure only when some dataset has ≥ 3 budgets)."""
    if not runs:
        return []
    out.mkdir(parents=True, exist_ok=True)
    paths = [accuracy_per_dataset(runs, out / "accuracy_per_dataset.png", level),
             fg_ratio_layers(runs, out / "fg_ratio_per_layer.png", level),
             accuracy_vs_budget(runs, out / "accuracy_vs_budget.png", level)]
    return [p for p in paths if p is not None]
