"""Paper-style tables from finished runs: ``mmprompt report runs/base2new runs/fewshot``.

Every run folder that finished its test stage holds a ``results.json`` (see ``docs/protocols.md``).
This module reads them all, groups them by protocol label and backbone (one table per backbone:
results of different models never share a table), then by method, dataset and shots, and writes:

* base-to-novel tables: base / novel accuracy as seed mean ± std, the HM of the seed-mean base and
  novel accuracies (the published convention), the seed mean ± std of the per-seed HM, and one
  average row per method whose HM is the HM of the dataset-averaged base and novel accuracies;
* few-shot tables: accuracy per K (one column per shots value) with an average row per method;
* transfer tables (cross-dataset / domain generalisation): accuracy per target dataset, the source
  (ImageNet) first and excluded from the target average.

Base-to-novel tables of ViT-B/16 with OpenAI weights carry the numbers the methods' papers report
(ViT-B/16, 16 shots; listed in docs/protocols.md, Report) as extra rows marked "(published)"; tables
of other backbones don't. Std is the sample std over seeds (ddof=1, as papers report with 3 seeds)
unless ``--std population`` is given; a single seed has no sample std and shows none.

Nothing is skipped silently: an unreadable or incomplete ``results.json`` stops the report with a
message naming every bad file, or, with ``--skip_invalid``, is listed as a warning on stderr and in
the Markdown.

Method labels and their order come from the method registry (`mmprompt.methods`), dataset keys,
aliases and the 11 datasets from the dataset registry (`mmprompt.data.registry`): this module only
consumes them. Kept free of torch/Lightning imports so ``mmprompt report`` starts instantly
(``tests/test_layering.py`` checks it).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import statistics
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

from ..data.protocol import normalise_name  # torch-free: the data package imports lazily
from ..data.registry import (
    BASE2NEW, CROSS_DATASET, DOMAIN_GENERALIZATION, dataset_key, protocol_datasets, specs, transfer_source,
)
from ..methods import methods
from ..results import RESULTS_FILE, harmonic_mean
from ..tables import markdown_grid, write_csv as write_records_csv, write_markdown
from .report_stats import Interval, bootstrap_accuracy, bootstrap_hm, marked, paired_difference, t_interval

SOURCE_DATASET = transfer_source()
TRANSFER_PROTOCOL_PREFIXES = (CROSS_DATASET, DOMAIN_GENERALIZATION)
#: the 11 CoOp datasets (keys = config stems) in the papers' column order
STANDARD_DATASETS: tuple[str, ...] = protocol_datasets(BASE2NEW)
#: datasets of a standard protocol, in the registry's (the papers') order; others sort after them by name
KNOWN_DATASETS: tuple[str, ...] = tuple(spec.key for spec in specs() if spec.protocols or spec.transfer_source)


# -- published references (the papers' base-to-novel numbers: ViT-B/16, 16 shots) ---------------------

@dataclass(frozen=True)
class Published:
    method: str  # display name
    dataset: str  # config stem or "average"
    base: float
    new: float
    hm: float


PUBLISHED: tuple[Published, ...] = (
    Published("CLIP zero-shot", "average", 69.34, 74.22, 71.70),
    Published("CoOp", "average", 82.69, 63.22, 71.66),
    Published("CoCoOp", "average", 80.47, 71.69, 75.83),
    Published("KgCoOp", "average", 80.73, 73.60, 77.00),
    Published("MaPLe", "average", 82.28, 75.14, 78.55),
    Published("PromptSRC", "average", 84.26, 76.10, 79.97),
    Published("MaPLe", "eurosat", 94.07, 73.23, 82.35),
)


PUBLISHED_BACKBONE = "ViT-B-16"  # the published rows are ViT-B/16 with OpenAI weights


def matches_published(backbone: str, pretrained: str | None) -> bool:
    """True when results are comparable with the published rows: ViT-B/16 (QuickGELU or not), OpenAI weights."""
    return backbone.removesuffix("-quickgelu") == PUBLISHED_BACKBONE and pretrained == "openai"


# -- reading results.json ------------------------------------------------------------------------------

class ReportError(Exception):
    """Bad or missing inputs; the message names every offending file."""


@dataclass(frozen=True)
class RunResult:
    """One finished run, as read from its results.json."""

    path: Path
    protocol: str
    method: str
    dataset: str
    seed: int
    shots: int | None
    metrics: dict[str, float]
    backbone: str = "unknown"  # open_clip model name; results of different backbones never share a table
    pretrained: str | None = "openai"  # weights tag; older results.json lack it (assumed the default)

    @property
    def base_new(self) -> tuple[float, float] | None:
        """(base, novel) accuracy when the run tested both halves, else None."""
        if "test/base/acc" in self.metrics and "test/new/acc" in self.metrics:
            return self.metrics["test/base/acc"], self.metrics["test/new/acc"]
        return None

    @property
    def key(self) -> tuple[str, str, str, str, int | None, int]:
        return self.protocol, self.backbone, self.method, self.dataset, self.shots, self.seed


def find_results(folders: Iterable[Path]) -> list[Path]:
    """Every results.json under the folders (a results.json path counts as itself), deduplicated, sorted."""
    found: set[Path] = set()
    for folder in map(Path, folders):
        if folder.is_file():
            found.add(folder.resolve())
        elif folder.is_dir():
            found.update(p.resolve() for p in folder.rglob(RESULTS_FILE))
        else:
            raise ReportError(f"{folder}: no such file or folder")
    return sorted(found)


def _field(data: dict, name: str, kind: type | tuple[type, ...], optional: bool = False):
    """A typed field of results.json; bools are rejected where numbers are expected."""
    if name not in data:
        if optional:
            return None
        raise ValueError(f"missing field {name!r}")
    value = data[name]
    if (value is None and optional) or (isinstance(value, kind) and not isinstance(value, bool)):
        return value
    raise ValueError(f"field {name!r} should be {getattr(kind, '__name__', kind)}, got {value!r}")


def _accuracies(metrics: dict) -> dict[str, float]:
    """Finite percentages; the run must have tested base and new, or all classes."""
    out = {}
    for name, value in metrics.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"metric {name!r} is not a finite number: {value!r}")
        if name.endswith("/acc") and not 0 <= value <= 100:
            raise ValueError(f"metric {name!r} = {value} is not a percentage in [0, 100]")
        out[name] = float(value)
    has_base_new = "test/base/acc" in out and "test/new/acc" in out
    if not has_base_new and "test/all/acc" not in out:
        raise ValueError("metrics hold neither test/base/acc + test/new/acc nor test/all/acc")
    return out


def load_result(path: Path) -> RunResult:
    """Parse one results.json; any problem raises ReportError naming the file."""
    try:
        data = json.loads(Path(path).read_text())
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        return RunResult(
            path=Path(path),
            protocol=_field(data, "protocol", str),
            method=_field(data, "method", str),
            dataset=dataset_key(_field(data, "dataset", str)),
            seed=_field(data, "seed", int),
            shots=_field(data, "shots", int, optional=True),
            metrics=_accuracies(_field(data, "metrics", dict)),
            backbone=_field(data, "model_name", str, optional=True) or "unknown",
            pretrained=_field(data, "pretrained", str, optional=True) if "pretrained" in data else "openai",
        )
    except (OSError, ValueError) as err:  # json.JSONDecodeError is a ValueError
        raise ReportError(f"{path}: {err}") from err


def load_results(folders: Iterable[Path], skip_invalid: bool = False) -> tuple[list[RunResult], list[str]]:
    """All runs under ``folders`` and the problems found (empty unless ``skip_invalid``).

    Strict by default: one bad file (or two files claiming the same protocol/method/dataset/shots/seed)
    raises a ReportError that lists them all. With ``skip_invalid`` they are returned as warnings.
    """
    runs: dict[tuple, RunResult] = {}
    problems: list[str] = []
    paths = find_results(folders)
    for path in paths:
        try:
            run = load_result(path)
        except ReportError as err:
            problems.append(str(err))
            continue
        if run.key in runs:
            problems.append(f"{path}: same protocol/backbone/method/dataset/shots/seed as {runs[run.key].path}")
            continue
        runs[run.key] = run
    if problems and not skip_invalid:
        raise ReportError("invalid results (use --skip_invalid to report the rest):\n  " + "\n  ".join(problems))
    if not runs:
        raise ReportError(f"no valid {RESULTS_FILE} found under: {', '.join(map(str, folders))}")
    return list(runs.values()), problems


# -- statistics ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Stat:
    """Mean and spread of one quantity over ``n`` values (seeds, or datasets for average rows)."""

    mean: float
    std: float  # nan when undefined (one value with ddof=1, or averages across datasets)
    n: int


def summarize(values: Sequence[float], ddof: int = 1) -> Stat:
    """Mean ± std with ``ddof`` 1 (sample) or 0 (population); std is nan when n <= ddof."""
    n = len(values)
    if n == 0:
        raise ValueError("no values to summarize")
    mean = statistics.fmean(values)
    if n <= ddof:
        return Stat(mean, math.nan, n)
    std = statistics.stdev(values) if ddof == 1 else statistics.pstdev(values)
    return Stat(mean, std, n)


def mean_only(values: Sequence[float]) -> Stat:
    """An average across datasets: no std (datasets are not samples of one thing)."""
    return Stat(statistics.fmean(values), math.nan, len(values))


def format_stat(stat: Stat | None, expected_n: int = 0, unit: str = "seeds") -> str:
    """``82.00 ± 2.00``; flags a cell built from fewer/more values than the table's usual count."""
    if stat is None:
        return "–"
    text = f"{stat.mean:.2f}" if math.isnan(stat.std) else f"{stat.mean:.2f} ± {stat.std:.2f}"
    return text if stat.n == expected_n or not expected_n else f"{text} ({stat.n} {unit})"


def csv_number(value: float | None) -> str:
    return "" if value is None or math.isnan(value) else f"{value:.4f}"


# -- tables --------------------------------------------------------------------------------------------

@dataclass
class Table:
    """One paper table: Markdown cells and CSV records built side by side from the same numbers."""

    protocol: str
    kind: str  # base2new, fewshot or transfer
    title: str
    header: list[str]
    rows: list[list[str]] = field(default_factory=list)
    records: list[dict[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    backbone: str = "unknown"


def method_order(method: str) -> tuple[int, str]:
    """The registry's order (zero-shot and the published methods first, bias tuning last), then
    unregistered methods alphabetically."""
    order = [normalise_name(info.label) for info in methods()]
    key = normalise_name(method)
    return (order.index(key), "") if key in order else (len(order), key)


def dataset_order(dataset: str) -> tuple[int, str]:
    """The registry's (the papers') order, then other datasets (custom ones) by name."""
    if dataset in KNOWN_DATASETS:
        return KNOWN_DATASETS.index(dataset), ""
    return len(KNOWN_DATASETS), dataset


def coverage_note(method: str, datasets: Iterable[str]) -> str | None:
    """Say which of the 11 datasets an average lacks, so partial averages are not mistaken for the paper's."""
    missing = [d for d in STANDARD_DATASETS if d not in set(datasets)]
    if not missing:
        return None
    return f"{method}: average over {len(STANDARD_DATASETS) - len(missing)} of the 11 datasets (missing: {', '.join(missing)})"


def group(runs: Iterable[RunResult], key: Callable[[RunResult], tuple]) -> dict[tuple, list[RunResult]]:
    groups: dict[tuple, list[RunResult]] = defaultdict(list)
    for run in runs:
        groups[key(run)].append(run)
    return groups


def seeds_text(runs: Sequence[RunResult]) -> str:
    return ",".join(str(s) for s in sorted(r.seed for r in runs))


@dataclass(frozen=True)
class BaseNewStats:
    """Base-to-novel summary of one method on one dataset (or averaged over datasets)."""

    base: Stat
    new: Stat
    hm: float  # HM of base.mean and new.mean
    hm_seeds: Stat | None  # mean ± std of the per-seed HM (None for average rows)


def base_new_stats(runs: Sequence[RunResult], ddof: int) -> BaseNewStats:
    pairs = [run.base_new for run in runs]
    base = summarize([b for b, _ in pairs], ddof)
    new = summarize([n for _, n in pairs], ddof)
    return BaseNewStats(base, new, harmonic_mean(base.mean, new.mean),
                        summarize([harmonic_mean(b, n) for b, n in pairs], ddof))


def average_base_new(per_dataset: Sequence[BaseNewStats]) -> BaseNewStats:
    """Average row: mean over datasets of the seed means, then HM of those averages (not mean of HMs)."""
    base = mean_only([s.base.mean for s in per_dataset])
    new = mean_only([s.new.mean for s in per_dataset])
    return BaseNewStats(base, new, harmonic_mean(base.mean, new.mean), None)


BASE_NEW_HEADER = ["method", "dataset", "seeds", "base", "novel", "HM", "HM per seed"]


def base_new_row(table: Table, method: str, dataset: str, seeds: str, stats: BaseNewStats, n_seeds: int) -> None:
    """Append one of our rows (Markdown cells + CSV record); average rows have no per-seed HM."""
    average = stats.hm_seeds is None
    unit, expected = ("datasets", stats.base.n) if average else ("seeds", n_seeds)
    label = f"average of {stats.base.n}" if average else dataset
    table.rows.append([method, label, seeds, format_stat(stats.base, expected, unit),
                       format_stat(stats.new, expected, unit), f"{stats.hm:.2f}", format_stat(stats.hm_seeds)])
    table.records.append({
        "source": "ours", "method": method, "dataset": dataset, "seeds": seeds,
        "n": str(stats.base.n), "n_of": unit,
        "base_mean": csv_number(stats.base.mean), "base_std": csv_number(stats.base.std),
        "new_mean": csv_number(stats.new.mean), "new_std": csv_number(stats.new.std), "hm": csv_number(stats.hm),
        "hm_seed_mean": csv_number(stats.hm_seeds.mean if stats.hm_seeds else None),
        "hm_seed_std": csv_number(stats.hm_seeds.std if stats.hm_seeds else None),
    })


def published_row(table: Table, ref: Published) -> None:
    dataset = "average of 11" if ref.dataset == "average" else ref.dataset
    table.rows.append([f"{ref.method} (published)", dataset, "", f"{ref.base:.2f}", f"{ref.new:.2f}",
                       f"{ref.hm:.2f}", ""])
    table.records.append({"source": "published", "method": ref.method, "dataset": ref.dataset,
                          "base_mean": f"{ref.base:.4f}", "new_mean": f"{ref.new:.4f}", "hm": f"{ref.hm:.4f}"})


def base_new_table(protocol: str, runs: Sequence[RunResult], ddof: int) -> Table:
    """Rows per dataset (ours then published), then each method's average row, then the published averages.

    Published rows only join tables of the backbone they were measured with (ViT-B/16, OpenAI weights).
    """
    table = Table(protocol, "base2new", f"{protocol}: base-to-novel (accuracy %)", BASE_NEW_HEADER)
    cells = group(runs, lambda r: (r.method, r.dataset))
    n_seeds = max(len(v) for v in cells.values())
    datasets = sorted({r.dataset for r in runs}, key=dataset_order)
    methods = sorted({r.method for r in runs}, key=method_order)
    references = PUBLISHED if all(matches_published(r.backbone, r.pretrained) for r in runs) else ()
    for dataset in datasets:
        for method in methods:
            if (method, dataset) in cells:
                cell = cells[(method, dataset)]
                base_new_row(table, method, dataset, seeds_text(cell), base_new_stats(cell, ddof), n_seeds)
        for ref in references:
            if ref.dataset == dataset:
                published_row(table, ref)
    for method in methods:
        present = [d for d in datasets if (method, d) in cells]
        stats = average_base_new([base_new_stats(cells[(method, d)], ddof) for d in present])
        base_new_row(table, method, "average", "", stats, n_seeds)
        table.notes.extend(filter(None, [coverage_note(method, present)]))
    for ref in references:
        if ref.dataset == "average":
            published_row(table, ref)
    table.notes.append("HM = HM of the seed-mean base and novel accuracies; average rows: HM of the "
                       "dataset-averaged base and novel accuracies. " + (
                           "Published: the methods' papers (ViT-B/16, 16 shots)." if references else
                           "No published rows: they are ViT-B/16 with OpenAI weights, this table is not."))
    return table


def accuracy_stats(runs: Sequence[RunResult], ddof: int) -> Stat:
    return summarize([run.metrics["test/all/acc"] for run in runs], ddof)


def accuracy_record(method: str, dataset: str, shots: int | None, stat: Stat, unit: str) -> dict[str, str]:
    return {"source": "ours", "method": method, "dataset": dataset, "shots": "" if shots is None else str(shots),
            "n": str(stat.n), "n_of": unit, "acc_mean": csv_number(stat.mean), "acc_std": csv_number(stat.std)}


def fewshot_table(protocol: str, runs: Sequence[RunResult], ddof: int) -> Table:
    """Rows method × dataset, one column per K, and an average row per method over its datasets."""
    shots = sorted({r.shots for r in runs}, key=lambda k: -1 if k is None else k)
    table = Table(protocol, "fewshot", f"{protocol}: accuracy per shots K (%)",
                  ["method", "dataset", *(f"K={k}" for k in shots)])
    cells = group(runs, lambda r: (r.method, r.dataset, r.shots))
    n_seeds = max(len(v) for v in cells.values())
    datasets = sorted({r.dataset for r in runs}, key=dataset_order)
    for method in sorted({r.method for r in runs}, key=method_order):
        present = [d for d in datasets if any((method, d, k) in cells for k in shots)]
        per_k: dict[int | None, list[float]] = defaultdict(list)
        for dataset in present:
            row = [method, dataset]
            for k in shots:
                stat = accuracy_stats(cells[(method, dataset, k)], ddof) if (method, dataset, k) in cells else None
                row.append(format_stat(stat, n_seeds))
                if stat is not None:
                    per_k[k].append(stat.mean)
                    table.records.append(accuracy_record(method, dataset, k, stat, "seeds"))
            table.rows.append(row)
        averages = {k: mean_only(per_k[k]) for k in shots if per_k[k]}
        table.rows.append([method, f"average of {len(present)}",
                           *(format_stat(averages.get(k), len(present), "datasets") for k in shots)])
        table.records.extend(accuracy_record(method, "average", k, s, "datasets") for k, s in averages.items())
        table.notes.extend(filter(None, [coverage_note(method, present)]))
    return table


def transfer_table(protocol: str, runs: Sequence[RunResult], ddof: int) -> Table:
    """Rows per method, the source dataset first, then each target, then the mean over targets."""
    datasets = sorted({r.dataset for r in runs}, key=lambda d: (d != SOURCE_DATASET, dataset_order(d)))
    targets = [d for d in datasets if d != SOURCE_DATASET]
    header = ["method", *(f"{d} (source)" if d == SOURCE_DATASET else d for d in datasets),
              f"average of {len(targets)} targets"]
    table = Table(protocol, "transfer", f"{protocol}: accuracy per target dataset (%)", header)
    cells = group(runs, lambda r: (r.method, r.dataset))
    n_seeds = max(len(v) for v in cells.values())
    for method in sorted({r.method for r in runs}, key=method_order):
        stats = {d: accuracy_stats(cells[(method, d)], ddof) for d in datasets if (method, d) in cells}
        target_means = [stats[d].mean for d in targets if d in stats]
        average = mean_only(target_means) if target_means else None
        table.rows.append([method, *(format_stat(stats.get(d), n_seeds) for d in datasets),
                           format_stat(average, len(targets), "targets")])
        table.records.extend(accuracy_record(method, d, cells[(method, d)][0].shots, s, "seeds")
                             for d, s in stats.items())
        if average is not None:
            table.records.append(accuracy_record(method, "average_targets", None, average, "datasets"))
    table.notes.append(f"The average excludes the source dataset ({SOURCE_DATASET}).")
    return table


def is_transfer(protocol: str) -> bool:
    return protocol.startswith(TRANSFER_PROTOCOL_PREFIXES)


def build_tables(runs: Sequence[RunResult], ddof: int = 1) -> list[Table]:
    """One table per protocol label and kind of run (base/new runs vs all-class runs)."""
    tables = []
    for (protocol, backbone), protocol_runs in sorted(group(runs, lambda r: (r.protocol, r.backbone)).items()):
        base_new = [r for r in protocol_runs if r.base_new is not None]
        single = [r for r in protocol_runs if r.base_new is None]
        built = [base_new_table(protocol, base_new, ddof)] if base_new else []
        if single:
            built.append((transfer_table if is_transfer(protocol) else fewshot_table)(protocol, single, ddof))
        for table in built:
            table.backbone, table.title = backbone, f"{table.title}, backbone {backbone}"
        tables.extend(built)
    return tables


# -- intervals and paired differences (mmprompt.tools.report_stats) -----------------------------------------

ZERO_SHOT_LABEL = "ZeroShot"  # nothing in zero-shot CLIP depends on the seed: one run pairs with every seed
METRIC_NAMES = {"test/base/acc": "base", "test/new/acc": "novel", "test/hm": "HM", "test/all/acc": "accuracy"}


def run_metrics(run: RunResult) -> dict[str, float]:
    """The metrics the interval tables show: base, novel and the per-seed HM, or the all-class accuracy."""
    if run.base_new is not None:
        base, new = run.base_new
        return {"test/base/acc": base, "test/new/acc": new, "test/hm": harmonic_mean(base, new)}
    return {"test/all/acc": run.metrics["test/all/acc"]}


def image_counts(run_dir: Path) -> dict[str, int]:
    """How many test images each accuracy of a run counted, from its config.yaml and the dataset's split
    file (base = the first ⌈n/2⌉ labels); empty when either can't be read (then no bootstrap)."""
    import yaml  # the report reads YAML only here

    from ..data.registry import get_spec

    try:
        data = (yaml.safe_load((run_dir / "config.yaml").read_text()) or {}).get("data") or {}
        spec = get_spec(str(data["dataset"]))
        split = json.loads((spec.dataset_dir(data.get("root", "data")) / spec.split_file).read_text())
    except (OSError, KeyError, ValueError, TypeError):
        return {}
    labels = [int(item[1]) for items in split.values() for item in items]
    cut = math.ceil((max(labels) + 1) / 2)
    test = [int(item[1]) for item in split.get("test", [])]
    return {"test/base/acc": sum(label < cut for label in test), "test/new/acc": sum(label >= cut for label in test),
            "test/all/acc": len(test)}


def cell_dataset(run: RunResult, runs: Sequence[RunResult]) -> str:
    """The dataset, with ``K=<shots>`` when the protocol's runs have several shot counts (few-shot)."""
    return run.dataset if len({r.shots for r in runs}) == 1 else f"{run.dataset}, K={run.shots}"


def cell_interval(runs: Sequence[RunResult], metric: str, level: float) -> Interval | None:
    """A t-interval over seeds, or for a single run a bootstrap over its test images (None: no image count)."""
    values = [run_metrics(run)[metric] for run in runs]
    if len(values) > 1:
        return t_interval(values, level)
    counts = image_counts(runs[0].path.parent)
    if metric == "test/hm" and counts:
        base, new = runs[0].base_new
        return bootstrap_hm(base, counts["test/base/acc"], new, counts["test/new/acc"], level)
    return bootstrap_accuracy(values[0], counts[metric], level) if counts.get(metric) else None


def per_seed(runs: Sequence[RunResult], metric: str) -> dict[int, float] | float:
    """A cell's values by seed; zero-shot's single run as a plain number (the same for every seed)."""
    if len(runs) == 1 and normalise_name(runs[0].method) == normalise_name(ZERO_SHOT_LABEL):
        return run_metrics(runs[0])[metric]
    return {run.seed: run_metrics(run)[metric] for run in runs}


def interval_table(protocol: str, runs: Sequence[RunResult], level: float) -> Table:
    """Mean and {level} interval of every metric in every method × dataset cell."""
    metrics = list(dict.fromkeys(m for run in runs for m in run_metrics(run)))
    percent = f"{level:.0%}"
    table = Table(protocol, "intervals", f"{protocol}: mean [{percent} interval] (%)",
                  ["method", "dataset", "seeds", *(METRIC_NAMES[m] for m in metrics), "interval"])
    cells = group(runs, lambda r: (r.method, cell_dataset(r, runs)))
    for method, dataset in sorted(cells, key=lambda k: (dataset_order(k[1]), method_order(k[0]))):
        cell = cells[(method, dataset)]
        intervals = {m: cell_interval(cell, m, level) for m in metrics}
        kind = next((i.kind for i in intervals.values() if i is not None and i.defined), "none")
        table.rows.append([method, dataset, seeds_text(cell),
                           *(i.text(2) if i is not None else "–" for i in intervals.values()), kind])
        record = {"method": method, "dataset": dataset, "seeds": seeds_text(cell), "interval": kind}
        for m, i in intervals.items():
            name = METRIC_NAMES[m]
            record.update({f"{name}_mean": csv_number(i.mean if i else None),
                           f"{name}_low": csv_number(i.low if i else None),
                           f"{name}_high": csv_number(i.high if i else None)})
        table.records.append(record)
    table.notes.append(f"{percent} intervals: Student t over seeds; a single run: percentile bootstrap over its "
                       "test images (4,000 resamples).")
    return table


def paired_table(protocol: str, runs: Sequence[RunResult], level: float) -> Table:
    """Every two methods on each dataset, A − B on the seeds both ran (zero-shot pairs with every seed); A is
    the method later in the registry's order (bias tuning last, zero-shot first), so a row reads as a gain."""
    metrics = list(dict.fromkeys(m for run in runs for m in run_metrics(run)))
    table = Table(protocol, "paired", f"{protocol}: paired differences A − B, mean [{level:.0%} interval] "
                  f"(points); ≈ inside the noise",
                  ["dataset", "A", "B", "seeds", *(METRIC_NAMES[m] for m in metrics)])
    cells = group(runs, lambda r: (r.method, cell_dataset(r, runs)))
    for dataset in sorted({d for _, d in cells}, key=dataset_order):
        present = sorted((m for m, d in cells if d == dataset), key=method_order, reverse=True)
        for a, b in itertools.combinations(present, 2):  # later in the registry − earlier: a gain over zero-shot
            differences = paired_row(cells[(a, dataset)], cells[(b, dataset)], metrics, level)
            if differences is None:
                continue
            seeds, values = differences
            table.rows.append([dataset, a, b, seeds, *(marked(d, 2) for d in values.values())])
            record = {"dataset": dataset, "a": a, "b": b, "seeds": seeds}
            for m, d in values.items():
                name = METRIC_NAMES[m]
                record.update({f"{name}_diff": csv_number(d.mean), f"{name}_low": csv_number(d.low),
                               f"{name}_high": csv_number(d.high), f"{name}_inside_noise": str(d.inside_noise)})
            table.records.append(record)
    table.notes.append("Paired: the per-seed differences (same seeds = same few-shot draws) and their Student t "
                       "interval; ≈ marks an interval that contains 0.")
    return table


def paired_row(a: Sequence[RunResult], b: Sequence[RunResult], metrics: Sequence[str],
               level: float) -> tuple[str, dict[str, Interval]] | None:
    """The differences of two cells, or None when they share no seed (and neither is zero-shot)."""
    try:
        values = {m: paired_difference(per_seed(a, m), per_seed(b, m), level) for m in metrics}
    except ValueError:
        return None
    sides = [set(side) for side in (per_seed(a, metrics[0]), per_seed(b, metrics[0])) if isinstance(side, dict)]
    return ",".join(map(str, sorted(set.intersection(*sides)))), values


def statistics_tables(runs: Sequence[RunResult], level: float = 0.95) -> list[Table]:
    """The interval table and the paired-difference table of each protocol label and backbone."""
    tables = []
    kinds = group(runs, lambda r: (r.protocol, r.backbone, r.base_new is None))
    for (protocol, backbone, _), protocol_runs in sorted(kinds.items()):
        for build in (interval_table, paired_table):
            table = build(protocol, protocol_runs, level)
            if table.rows:
                table.backbone, table.title = backbone, f"{table.title}, backbone {backbone}"
                tables.append(table)
    return tables


# -- output --------------------------------------------------------------------------------------------

def table_markdown(table: Table) -> str:
    lines = [f"## {table.title}", "", markdown_grid(table.header, table.rows)]
    lines += [f"- {note}" for note in table.notes]
    return "\n".join(lines) + "\n"


def render_markdown(tables: Sequence[Table], problems: Sequence[str], std_label: str) -> str:
    parts = ["# mmprompt report", "", f"Mean ± {std_label} std over seeds; accuracies in percent.", ""]
    parts += [table_markdown(t) for t in tables]
    if problems:
        parts += ["## Skipped results (invalid)", ""] + [f"- {p}" for p in problems] + [""]
    return "\n".join(parts)


def write_csv(table: Table, path: Path) -> None:
    columns = list(dict.fromkeys(k for record in table.records for k in record))
    records = [{"protocol": table.protocol, "backbone": table.backbone, **record} for record in table.records]
    write_records_csv(path, records, ["protocol", "backbone", *columns])


def write_report(tables: Sequence[Table], markdown: str, out: Path, fmt: str) -> list[Path]:
    """Write ``report.md`` and/or one ``<protocol>_<kind>.csv`` per table into ``out``; return the paths.

    Tables of one protocol and kind on several backbones get the backbone in their file name.
    """
    out.mkdir(parents=True, exist_ok=True)
    written = []
    if fmt in ("markdown", "both"):
        write_markdown(out / "report.md", markdown)
        written.append(out / "report.md")
    if fmt in ("csv", "both"):
        shared = Counter((table.protocol, table.kind) for table in tables)
        for table in tables:
            suffix = f"_{table.backbone}" if shared[(table.protocol, table.kind)] > 1 else ""
            path = out / f"{table.protocol}_{table.kind}{suffix}.csv"
            write_csv(table, path)
            written.append(path)
    return written


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mmprompt report", description=__doc__.split("\n\n")[0])
    parser.add_argument("folders", nargs="+", type=Path, help="run folders searched recursively for results.json")
    parser.add_argument("--out_dir", dest="out", type=Path, help="output folder (default: <first folder>/report)")
    parser.add_argument("--format", choices=("markdown", "csv", "both"), default="both", help="files to write")
    parser.add_argument("--std", choices=("sample", "population"), default="sample",
                        help="std over seeds: sample (ddof=1, default) or population (ddof=0)")
    parser.add_argument("--skip_invalid", action="store_true",
                        help="report the valid runs and list invalid results.json files as warnings")
    parser.add_argument("--level", type=float, default=0.95,
                        help="confidence level of the intervals and paired differences (default 0.95)")
    parser.add_argument("--figures", action="store_true",
                        help="also write PNG figures (accuracy per dataset, fg_ratio per layer, accuracy vs budget)")
    parser.add_argument("--claims", action="store_true",
                        help="also write the claims table (claims.md/.csv; runs of configs/presets/claims.yaml)")
    parser.add_argument("--quiet", action="store_true", help="do not print the Markdown")
    return parser


def main(argv: list[str] | None = None) -> int:
    """``mmprompt report``: 0 on success, 2 when the inputs are invalid (message on stderr)."""
    args = build_parser().parse_args(argv)
    try:
        runs, problems = load_results(args.folders, skip_invalid=args.skip_invalid)
    except ReportError as err:
        print(f"mmprompt report: {err}", file=sys.stderr)
        return 2
    for problem in problems:
        print(f"mmprompt report: warning: skipped {problem}", file=sys.stderr)
    if not 0.5 <= args.level < 1:
        print(f"mmprompt report: --level {args.level}: expected a confidence level in [0.5, 1), e.g. 0.95",
              file=sys.stderr)
        return 2
    tables = build_tables(runs, ddof=1 if args.std == "sample" else 0) + statistics_tables(runs, args.level)
    markdown = render_markdown(tables, problems, args.std)
    if not args.quiet:
        print(markdown)
    first = args.folders[0]
    out = args.out or (first.parent if first.is_file() else first) / "report"
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out_dir {out} is a file; expected a folder for the report's tables")
    written = write_report(tables, markdown, out, args.format)
    if args.claims or args.figures:
        from . import report_claims  # the claims of docs/analysis.md §6: interventions, fg_ratio, budgets

        written += report_claims.write(runs, out, level=args.level, claims=args.claims, figures=args.figures)
    for path in written:
        print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
