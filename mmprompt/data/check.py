"""Check a dataset tree before training on it: every listed image exists and opens, masks read and
match their images, classes are non-empty, splits don't overlap. ``mmprompt check-data`` runs `main`.
"""

from __future__ import annotations

import argparse
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from .catalog import Catalog, Item, open_rgb
from .custom import resolve_spec
from .masks import MaskSource
from .registry import DatasetSpec


@dataclass(frozen=True)
class Problem:
    path: str
    message: str


@dataclass
class CheckReport:
    """What `check_dataset` found; ``ok`` is False when there is any problem."""

    dataset: str
    dataset_dir: str
    classnames: tuple[str, ...] = ()
    split_sizes: dict[str, int] = field(default_factory=dict)
    class_counts: dict[str, dict[str, int]] = field(default_factory=dict)
    images_checked: int = 0
    masks_found: int = 0
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def format(self) -> str:
        lines = [f"dataset {self.dataset} at {self.dataset_dir}", f"classes: {len(self.classnames)}"]
        lines += [f"{split}: {n} images" for split, n in self.split_sizes.items()]
        if self.class_counts:
            splits = list(self.class_counts)
            lines.append("class counts (" + " / ".join(splits) + "):")
            lines += [f"  {name}: " + " / ".join(str(self.class_counts[s].get(name, 0)) for s in splits)
                      for name in self.classnames]
        lines.append(f"images opened: {self.images_checked}, with a foreground mask: {self.masks_found}")
        lines += [f"PROBLEM {p.path}: {p.message}" for p in self.problems]
        lines.append("OK" if self.ok else f"{len(self.problems)} problem(s)")
        return "\n".join(lines)


def spread(items: list[Item], limit: int | None) -> list[Item]:
    """At most ``limit`` items, evenly spaced so every part of a split (every class) is sampled."""
    if limit is None or len(items) <= limit:
        return items
    step = len(items) / limit
    return [items[int(i * step)] for i in range(limit)]


#: splits whose every class must have an image: training needs each, a test accuracy of a class
#: without test images is meaningless (it used to read 100.00)
SPLITS_EVERY_CLASS_NEEDS = {"train": "training", "test": "test"}


def count_classes(catalog: Catalog, report: CheckReport) -> None:
    for split, items in catalog.splits.items():
        counts = Counter(item.label for item in items)
        report.split_sizes[split] = len(items)
        report.class_counts[split] = {name: counts.get(i, 0) for i, name in enumerate(catalog.classnames)}


def catalog_problems(catalog: Catalog) -> list[Problem]:
    """What makes a listing unfit to train or test on: an empty train split, a class without training
    or test images (when it lists any), an image listed twice (in two splits: test data leaks into
    training)."""
    problems: list[Problem] = []
    for split, what in SPLITS_EVERY_CLASS_NEEDS.items():
        items = catalog.splits.get(split)
        if not items:  # absent; or an empty test split (``--ratios 1 0 0``: train only, nothing to test)
            problems += [Problem(split, "the train split lists no images")] if items == [] and split == "train" else []
            continue
        counts = Counter(item.label for item in items)
        problems += [Problem(f"{split}/{name}", f"class has no {what} images")
                     for label, name in enumerate(catalog.classnames) if counts[label] == 0]
    return problems + listed_twice(catalog)


def listed_twice(catalog: Catalog) -> list[Problem]:
    """Images listed in two splits (test data leaking into training) or twice in one split."""
    problems: list[Problem] = []
    seen: dict[str, str] = {}
    for split, items in catalog.splits.items():
        counts = Counter(item.path for item in items)
        problems += [Problem(path, f"listed {n} times in {split}") for path, n in counts.items() if n > 1]
        for path in counts:
            if seen.setdefault(path, split) != split:
                problems.append(Problem(path, f"listed in both {seen[path]} and {split}"))
    return problems


def refuse_catalog_problems(catalog: Catalog, where: str, shown: int = 5) -> None:
    """Raise naming the first ``shown`` `catalog_problems` of ``catalog`` (``where``: the dataset and its folder)."""
    problems = catalog_problems(catalog)
    if problems:
        listed = "\n".join(f"  {p.path}: {p.message}" for p in problems[:shown])
        more = f"\n  ... and {len(problems) - shown} more" if len(problems) > shown else ""
        raise ValueError(f"{where}: the split listing has {len(problems)} problem(s):\n{listed}{more}\n"
                         "fix the split file (mmprompt check-data lists every problem)")


def check_item(base: Path, item: Item, masks: MaskSource | None, report: CheckReport) -> None:
    try:
        image = open_rgb(base / item.path)
        report.images_checked += 1
        if masks is not None and masks(base, item.path, image.size) is not None:
            report.masks_found += 1
    except (OSError, ValueError) as err:
        report.problems.append(Problem(str(base / item.path), str(err)))


def check_dataset(
    dataset: str, root: str | Path = "data", limit: int | None = None, split_file: str | None = None,
    image_dir: str | None = None, mask_dir: str | None = None,
) -> CheckReport:
    """Check ``dataset`` under ``root`` (``limit``: images opened per split, evenly spread).

    Only reads: generated (synthetic) data is not generated here, so a mistyped root is reported
    as missing rather than filled with a fresh tree that then checks OK."""
    try:
        spec: DatasetSpec = resolve_spec(dataset, split_file, image_dir, mask_dir)
    except (OSError, ValueError) as err:
        return CheckReport(dataset, str(root), problems=[Problem("--dataset/--split_file/--mask_dir", str(err))])
    base = spec.dataset_dir(root)
    report = CheckReport(spec.name, str(base))
    try:
        catalog = spec.read_catalog(root)
    except (OSError, ValueError) as err:
        generated = "\nthis dataset is generated by `mmprompt fit`/`test` on first use (check-data only checks)"
        report.problems.append(Problem(str(base), str(err) + (generated if spec.generate is not None else "")))
        return report
    report.classnames = catalog.classnames
    count_classes(catalog, report)
    report.problems += catalog_problems(catalog)
    masks = spec.masks() if spec.masks is not None else None
    for items in catalog.splits.values():
        for item in spread(items, limit):
            check_item(base, item, masks, report)
    return report


def main(argv: list[str] | None = None) -> int:
    """``mmprompt check-data --dataset NAME --root DIR [--limit N]``; exit code 1 on problems."""
    parser = argparse.ArgumentParser(prog="mmprompt check-data", description=__doc__)
    parser.add_argument("--dataset", default="synthetic", help="registered dataset name or 'custom'")
    parser.add_argument("--root", default="data", help="data root holding one folder per dataset")
    parser.add_argument("--limit", type=int, default=None, help="open at most N images per split (evenly spread)")
    parser.add_argument("--split_file", default=None, help="custom: the JSON split file")
    parser.add_argument("--image_dir", default=None, help="custom: folder the split paths are relative to")
    parser.add_argument("--mask_dir", default=None, help="custom: folder of masks at the same relative paths")
    args = parser.parse_args(argv)
    report = check_dataset(args.dataset, args.root, args.limit, args.split_file, args.image_dir, args.mask_dir)
    print(report.format())
    return 0 if report.ok else 1
