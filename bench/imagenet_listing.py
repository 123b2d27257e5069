"""How long listing a full-size ImageNet tree takes: 1000 wnid folders, 1281 train + 50 val empty
files each (1.28M + 50k), the counts of the real ILSVRC-2012 train/val sets.

    python bench/imagenet_listing.py /tmp/imagenet-fake        # builds the tree there, times, deletes it
    python bench/imagenet_listing.py /tmp/imagenet-fake --keep

Times (best of ``--repeat``): the catalog as the package on ``sys.path`` parses it (first run: no
listing cache; then with the cache; then after one file was added), and, for comparison, the
former listing (``Path.iterdir`` + ``is_file``: one stat per file). docs/datasets.md has the numbers.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

WNIDS = [f"n{index:08d}" for index in range(1000)]
COUNTS = {"train": 1281, "val": 50}


def build_tree(root: Path) -> Path:
    """``<root>/imagenet/images/{train,val}/<wnid>/<wnid>_<i>.JPEG`` (empty) + classnames.txt."""
    dataset = root / "imagenet"
    for split, count in COUNTS.items():
        for wnid in WNIDS:
            folder = dataset / "images" / split / wnid
            folder.mkdir(parents=True, exist_ok=True)
            for index in range(count):
                (folder / f"{wnid}_{index}.JPEG").touch()
    (dataset / "classnames.txt").write_text("".join(f"{wnid} class {wnid}\n" for wnid in WNIDS))
    return dataset


def stat_per_file_listing(dataset: Path) -> int:
    """The former ``catalog.list_files`` over every class folder (one stat per file)."""
    return sum(len(sorted(p.name for p in (dataset / "images" / split / wnid).iterdir()
                          if p.is_file() and not p.name.startswith(".")))
               for split in COUNTS for wnid in WNIDS)


def best_time(run, repeat: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeat):
        start = time.perf_counter()
        result = run()
        times.append(time.perf_counter() - start)
    return min(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", type=Path)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--keep", action="store_true", help="keep the tree (default: delete it)")
    args = parser.parse_args()
    from mmprompt.data import get_spec

    spec = get_spec("ImageNet")
    start = time.perf_counter()
    dataset = build_tree(args.root) if not (args.root / "imagenet" / "classnames.txt").is_file() else args.root / "imagenet"
    print(f"tree: {dataset} ({time.perf_counter() - start:.1f} s to build)", flush=True)
    try:
        cache = dataset / "split_fewshot" / "listing.json"
        cache.unlink(missing_ok=True)
        seconds, files = best_time(lambda: stat_per_file_listing(dataset), args.repeat)
        print(f"former listing (stat per file): {seconds:.2f} s, {files} files", flush=True)
        seconds, catalog = best_time(lambda: (cache.unlink(missing_ok=True), spec.read_catalog(args.root))[1], args.repeat)
        print(f"catalog, no listing cache: {seconds:.2f} s, {sum(map(len, catalog.splits.values()))} items", flush=True)
        seconds, _ = best_time(lambda: spec.read_catalog(args.root), args.repeat)
        print(f"catalog, listing cache: {seconds:.2f} s", flush=True)
        (dataset / "images" / "train" / WNIDS[0] / f"added-{time.time_ns()}.JPEG").touch()
        seconds, again = best_time(lambda: spec.read_catalog(args.root), 1)
        print(f"catalog after adding one file (one folder relisted): {seconds:.2f} s, "
              f"{sum(map(len, again.splits.values()))} items", flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(args.root)
    print(f"python {sys.version.split()[0]}")


if __name__ == "__main__":
    main()
