"""The claims table and the figures of ``mmprompt report --claims --figures`` (docs/analysis.md §6).

Runs are told apart by their **variant**: the run folder is ``<variant>-<dataset>/seed<k>`` (the sweep
names a run after its method config's stem, e.g. ``bias_1152``), and a variant's trailing number is
its trainable-parameter budget (configs/budgets/). Each claim is a difference that should be > 0,
measured per dataset as a paired t-interval over seeds (`mmprompt.tools.report_stats`):

| claim | difference (HM of base and novel accuracy per seed, or fg_ratio) |
|---|---|
| few-shot learning fixes something | tuned − zero-shot, for each variant run on every dataset |
| route 2 carries the gain | MaPLe's ``bias_only`` − ``attention_only`` (interventions.csv) |
| β is input-independent | MaPLe's ``mean_bias`` − ``bias_only``: inside the noise = no loss measured |
| route 1: prompts focus [cls] on the foreground | tuned − zero-shot fg_ratio, mean over a band of vision layers |
| bias tuning ≥ prompts at equal budget | bias tuning − a prompt method with the same parameter count |
| the margin is largest with limited category information | margin on world_limited − margin on each other dataset (Welch) |

A verdict is ``holds`` (interval above 0), ``does not hold`` (below 0) or ``inside the noise``.
Torch-free; matplotlib is imported only to draw.
"""

from __future__ import annotations

import csv
import json
import re
import statistics
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from ..results import harmonic_mean
from ..tables import markdown_grid, write_csv, write_markdown
from .report_stats import LEVEL, Interval, paired_difference, t_interval, verdict, welch_difference

ZERO_SHOT = "ZeroShot"
PROMPTS = ("vpt_deep", "ivlp", "maple")  # the prompt families, compared with bias tuning at equal budget
BIAS_OF = {"vpt_deep": "bias", "ivlp": "bias", "maple": "coupled_bias"}  # equal budgets come in these pairs
ROUTE_METHOD = "maple"  # the prompt method whose interventions and attention test the routes
LIMITED = "world_limited"
BANDS = ((0, 4), (4, 8), (8, 12))  # vision layer bands for route 1 (the tiny CLIP has 12)
FAMILY_LABELS = {"bias": "bias tuning", "coupled_bias": "coupled bias tuning", "vpt_deep": "VPT-deep",
                 "ivlp": "IVLP", "maple": "MaPLe", ZERO_SHOT: "zero-shot"}


@dataclass(frozen=True)
class ClaimRun:
    """One finished run as the claims see it."""

    folder: Path
    variant: str  # bias_1152, maple_38016, ZeroShot, ...
    dataset: str
    seed: int
    hm: float  # HM of this seed's base and novel accuracy

    @property
    def family(self) -> str:
        match = re.fullmatch(r"(.+)_(\d+)", self.variant)
        return match.group(1) if match else self.variant

    @property
    def budget(self) -> int | None:
        match = re.fullmatch(r".+_(\d+)", self.variant)
        return int(match.group(1)) if match else None


def claim_runs(runs: Iterable) -> list[ClaimRun]:
    """The base-to-novel runs (`report.RunResult`) with their variant, read from the run folder's name."""
    found = []
    for run in runs:
        if run.base_new is None:
            continue
        name = run.path.parent.parent.name
        variant = name[: -len(run.dataset) - 1] if name.endswith(f"-{run.dataset}") else run.method
        found.append(ClaimRun(run.path.parent, variant, run.dataset, run.seed, harmonic_mean(*run.base_new)))
    return found


def by_seed(runs: Sequence[ClaimRun], variant: str, dataset: str, value=lambda r: r.hm) -> dict[int, float]:
    return {r.seed: value(r) for r in runs if r.variant == variant and r.dataset == dataset}


def zero_shot_value(runs: Sequence[ClaimRun], dataset: str, value=lambda r: r.hm) -> float | None:
    values = [value(r) for r in runs if r.variant == ZERO_SHOT and r.dataset == dataset]
    return values[0] if values else None


# -- what the run folders hold -------------------------------------------------------------------------

def intervention_hm(run: ClaimRun, mode: str) -> float | None:
    """The HM of ``mode`` in the run's interventions.csv (None without the file or the mode)."""
    path = run.folder / "interventions.csv"
    if not path.is_file():
        return None
    with path.open() as handle:
        for row in csv.DictReader(handle):
            if row["mode"] == mode:
                return harmonic_mean(float(row["test/base/acc"]), float(row["test/new/acc"]))
    return None


def fg_ratio_per_layer(run: ClaimRun) -> list[float] | None:
    """The head-mean [cls] fg_ratio of each vision layer (attention_stats.json), None without the file."""
    path = run.folder / "attention_stats.json"
    if not path.is_file():
        return None
    layers = json.loads(path.read_text())["vision"]["fg_ratio"]
    return [statistics.fmean(heads) for heads in layers]


def band_mean(values: Sequence[float], band: tuple[int, int]) -> float:
    return statistics.fmean(values[band[0]:band[1]])


# -- claims --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Finding:
    claim: str
    dataset: str
    difference: Interval
    detail: str = ""

    @property
    def verdict(self) -> str:
        return verdict(self.difference)


def seeded(runs: Sequence[ClaimRun], dataset: str, family: str, value) -> dict[int, float]:
    """Per-seed values of ``value(run)`` for one variant of ``family`` on ``dataset``: the variant with the
    most runs where ``value`` is defined (e.g. the MaPLe budget whose runs wrote interventions.csv)."""
    by_variant: dict[str, dict[int, float]] = defaultdict(dict)
    for run in runs:
        if run.family == family and run.dataset == dataset and (v := value(run)) is not None:
            by_variant[run.variant][run.seed] = v
    return max(by_variant.values(), key=len, default={})


def route_findings(runs: Sequence[ClaimRun], datasets: Sequence[str], level: float = LEVEL) -> list[Finding]:
    """Route 2 carries the gain; β is input-independent (MaPLe's intervention tables)."""
    findings = []
    for dataset in datasets:
        modes = {m: seeded(runs, dataset, ROUTE_METHOD, lambda r, m=m: intervention_hm(r, m))
                 for m in ("full", "no_prompts", "attention_only", "bias_only", "mean_bias")}
        if len(modes["bias_only"]) < 2:
            continue
        gain = paired_difference(modes["full"], modes["no_prompts"], level)
        findings.append(Finding("route 2 carries the gain: MaPLe bias_only − attention_only (HM)", dataset,
                                paired_difference(modes["bias_only"], modes["attention_only"], level),
                                f"full − no_prompts {gain.text()}"))
        findings.append(Finding("β is input-independent: MaPLe mean_bias − bias_only (HM)", dataset,
                                paired_difference(modes["mean_bias"], modes["bias_only"], level)))
    return findings


def route1_findings(runs: Sequence[ClaimRun], datasets: Sequence[str], level: float = LEVEL) -> list[Finding]:
    """Route 1: tuned − zero-shot fg_ratio per band of vision layers, for each prompt method."""
    findings = []
    for dataset in datasets:
        zero = [r for r in runs if r.variant == ZERO_SHOT and r.dataset == dataset]
        reference = fg_ratio_per_layer(zero[0]) if zero else None
        if reference is None:
            continue
        for family in ("maple", "vpt_deep"):
            tuned = seeded(runs, dataset, family, fg_ratio_per_layer)
            for band in BANDS:
                if len(tuned) < 2:
                    continue
                values = {seed: band_mean(layers, band) for seed, layers in tuned.items()}
                findings.append(Finding(
                    f"route 1: {FAMILY_LABELS[family]} − zero-shot fg_ratio, vision layers {band[0]}-{band[1] - 1}",
                    dataset, paired_difference(values, band_mean(reference, band), level)))
    return findings


def budget_findings(runs: Sequence[ClaimRun], datasets: Sequence[str], level: float = LEVEL) -> list[Finding]:
    """Bias tuning − each prompt method at every budget both ran (HM), per dataset."""
    findings = []
    budgets = sorted({r.budget for r in runs if r.budget is not None})
    for budget in budgets:
        for prompt in PROMPTS:
            bias = f"{BIAS_OF[prompt]}_{budget}"
            for dataset in datasets:
                a, b = by_seed(runs, bias, dataset), by_seed(runs, f"{prompt}_{budget}", dataset)
                if len(set(a) & set(b)) >= 2:
                    findings.append(Finding(f"{FAMILY_LABELS[BIAS_OF[prompt]]} − {FAMILY_LABELS[prompt]} at "
                                            f"{budget:,} parameters (HM)", dataset, paired_difference(a, b, level)))
    return findings


def margin_findings(runs: Sequence[ClaimRun], datasets: Sequence[str], level: float = LEVEL, budget: int = 1152,
                    prompt: str = "vpt_deep") -> list[Finding]:
    """The bias − prompt margin on world_limited − the margin on each other dataset (unpaired: Welch)."""
    def margins(dataset: str) -> list[float]:
        a, b = by_seed(runs, f"bias_{budget}", dataset), by_seed(runs, f"{prompt}_{budget}", dataset)
        return [a[s] - b[s] for s in sorted(set(a) & set(b))]

    limited = margins(LIMITED)
    if len(limited) < 2:
        return []
    return [Finding(f"the margin (bias tuning − {FAMILY_LABELS[prompt]} at {budget:,}) is larger on {LIMITED} "
                    "than here", dataset, welch_difference(limited, other, level),
                    f"margin here {t_interval(other, level).text()}, on {LIMITED} {t_interval(limited, level).text()}")
            for dataset in datasets if dataset != LIMITED and len(other := margins(dataset)) >= 2]


def gain_findings(runs: Sequence[ClaimRun], datasets: Sequence[str], level: float = LEVEL) -> list[Finding]:
    """Few-shot learning has something to fix: tuned − zero-shot HM, for the variants run on every dataset."""
    with_zero_shot = [d for d in datasets if zero_shot_value(runs, d) is not None]
    variants = sorted({r.variant for r in runs if r.variant != ZERO_SHOT
                       and all(by_seed(runs, r.variant, d) for d in with_zero_shot)})
    return [Finding(f"few-shot learning fixes something: {variant} − zero-shot (HM)", dataset,
                    paired_difference(by_seed(runs, variant, dataset), zero_shot_value(runs, dataset), level))
            for variant in variants for dataset in with_zero_shot if len(by_seed(runs, variant, dataset)) >= 2]


def findings(runs: Sequence[ClaimRun], level: float = LEVEL) -> list[Finding]:
    """Every claim on every dataset that has the runs it needs (at least 2 seeds)."""
    datasets = sorted({r.dataset for r in runs})
    return (gain_findings(runs, datasets, level) + route_findings(runs, datasets, level)
            + route1_findings(runs, datasets, level)
            + budget_findings(runs, datasets, level) + margin_findings(runs, datasets, level))


def claims_table(found: Sequence[Finding]) -> tuple[str, list[dict[str, str]]]:
    """Markdown (claim × dataset, each cell ``verdict: Δ [low, high]``) and CSV records."""
    datasets = sorted({f.dataset for f in found})
    claims = list(dict.fromkeys(f.claim for f in found))
    cells = {(f.claim, f.dataset): f for f in found}
    short = {"holds": "holds", "does not hold": "does not hold", "inside the noise": "≈ noise"}
    rows = [[claim, *(f"{short[c.verdict]}: {c.difference.text(2)}" if (c := cells.get((claim, d))) else "–"
                      for d in datasets)] for claim in claims]
    records = [{"claim": f.claim, "dataset": f.dataset, "verdict": f.verdict, "difference": f"{f.difference.mean:.4f}",
                "low": f"{f.difference.low:.4f}", "high": f"{f.difference.high:.4f}", "n": str(f.difference.n),
                "detail": f.detail} for f in found]
    return markdown_grid(["claim", *datasets], rows), records


def write(results: Sequence, out: Path, level: float = 0.95, claims: bool = True, figures: bool = True) -> list[Path]:
    """claims.md / claims.csv and the PNG figures into ``out``; returns the paths written."""
    runs = claim_runs(results)
    written: list[Path] = []
    if claims:
        found = findings(runs, level)
        text, records = claims_table(found)
        details = [f"- {f.claim}, {f.dataset}: {f.detail}" for f in found if f.detail]
        write_markdown(out / "claims.md", f"# Claims\n\nEach cell: verdict: mean difference [{level:.0%} interval] over "
                       "seeds (paired; Welch for the margin row).\n\n" + text + "\n" + "\n".join(details) + "\n")
        write_csv(out / "claims.csv", records, list(records[0]) if records else ["claim"])
        written += [out / "claims.md", out / "claims.csv"]
    if figures:
        from .report_figures import draw_figures  # matplotlib

        written += draw_figures(runs, out, level)
    return written


def cells_by_variant(runs: Sequence[ClaimRun]) -> dict[tuple[str, str], list[ClaimRun]]:
    cells: dict[tuple[str, str], list[ClaimRun]] = defaultdict(list)
    for run in runs:
        cells[(run.variant, run.dataset)].append(run)
    return cells
