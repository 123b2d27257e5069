"""Few-shot sampling with a portable JSON cache, and the base/novel class split.

Sampling is a pure function of (listing, K, seed): items are grouped by label, each group sorted by
path, and one ``random.Random(seed)`` draws train (K per class) then val (min(K, 4) per class). So
every rank and machine draws the same subset without coordination; the cache (relative paths, plus a
fingerprint of the listing it was drawn from) makes the subset inspectable and stable across code
versions, like CoOp's ``split_fewshot/shot_K-seed_S.pkl`` but portable.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import warnings
from pathlib import Path

from .catalog import Catalog, Item, read_json, write_json_atomic

SUBSAMPLES = ("all", "base", "new")
VAL_SHOTS_CAP = 4
CACHE_VERSION = 1
FEWSHOT_DIR = "split_fewshot"


def check_shots(shots: int | None) -> int | None:
    """``None`` or -1 mean all images; otherwise K must be a positive integer."""
    if shots is None or shots == -1:
        return None
    if not isinstance(shots, int) or isinstance(shots, bool) or shots <= 0:
        raise ValueError(f"shots must be a positive integer K, or -1 / None for all images; got shots={shots!r}")
    return shots


def sample_per_class(items: list[Item], k: int, rng: random.Random) -> list[Item]:
    """K items per label (all if fewer), labels in order, each pool sorted before drawing."""
    pools: dict[int, list[Item]] = {}
    for item in items:
        pools.setdefault(item.label, []).append(item)
    out: list[Item] = []
    for label in sorted(pools):
        pool = sorted(pools[label])
        out.extend(pool if len(pool) <= k else sorted(rng.sample(pool, k)))
    return out


def sample_fewshot(catalog: Catalog, shots: int | None, seed: int) -> dict[str, list[Item]]:
    """The train and val items a run with ``shots`` and ``seed`` uses (all of them for ``None``)."""
    shots = check_shots(shots)
    train, val = catalog.split("train"), catalog.split("val")
    if shots is None:
        return {"train": list(train), "val": list(val)}
    rng = random.Random(seed)
    return {"train": sample_per_class(train, shots, rng), "val": sample_per_class(val, min(shots, VAL_SHOTS_CAP), rng)}


def fingerprint(catalog: Catalog) -> str:
    """Hash of the train/val listing a cache was drawn from: a changed split invalidates the cache."""
    data = [catalog.classnames, sorted(catalog.split("train")), sorted(catalog.split("val"))]
    return hashlib.sha256(json.dumps(data).encode()).hexdigest()[:16]


def cache_path(cache_dir: Path, shots: int | None, seed: int, prefix: str = "") -> Path:
    """``<cache_dir>/split_fewshot/<prefix>shot_<K>-seed_<seed>.json`` (CoOp's naming, JSON)."""
    return cache_dir / FEWSHOT_DIR / f"{prefix}shot_{shots}-seed_{seed}.json"


def encode(catalog: Catalog, subset: dict[str, list[Item]], shots: int, seed: int) -> dict:
    rows = {split: [[it.path, it.label, catalog.classnames[it.label]] for it in items] for split, items in subset.items()}
    return {"version": CACHE_VERSION, "shots": shots, "seed": seed, "source": fingerprint(catalog), **rows}


def decode(data: dict) -> dict[str, list[Item]]:
    return {split: [Item(str(p), int(label)) for p, label, _ in data[split]] for split in ("train", "val")}


def read_cache(path: Path, catalog: Catalog) -> dict[str, list[Item]] | None:
    """The cached subset at ``path``, or None (with a warning) when it is absent, stale or corrupt:
    a cache is only a convenience, so a damaged one is redrawn (and rewritten atomically), never fatal."""
    if not path.is_file():
        return None
    try:
        data = read_json(path, "few-shot cache")
        if data.get("version") == CACHE_VERSION and data.get("source") == fingerprint(catalog):
            return decode(data)
        reason = "was drawn from another split listing"
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:  # truncated, not JSON, wrong shape
        reason = f"is corrupt ({type(err).__name__}: {str(err)[:120]})"
    warnings.warn(f"few-shot cache {path} {reason}; re-sampling it")
    return None


def load_fewshot(catalog: Catalog, shots: int | None, seed: int, path: Path | None, write: bool = True) -> dict[str, list[Item]]:
    """The few-shot subset, read from ``path`` when it was drawn from this listing, else sampled and
    (with ``write``) cached there atomically. An unwritable cache folder only warns: sampling is
    deterministic, the cache is a convenience."""
    shots = check_shots(shots)
    if shots is None or path is None:
        return sample_fewshot(catalog, shots, seed)
    cached = read_cache(path, catalog)
    if cached is not None:
        return cached
    subset = sample_fewshot(catalog, shots, seed)
    if write:
        try:
            write_json_atomic(path, encode(catalog, subset, shots, seed))
        except OSError as err:
            warnings.warn(f"cannot write few-shot cache {path} ({err}); using the sampled split uncached")
    return subset


def class_subset(num_classes: int, subsample: str) -> list[int]:
    """Labels of ``subsample``: sorted labels, base = first ⌈n/2⌉, new = the rest (CoOp)."""
    if subsample not in SUBSAMPLES:
        raise ValueError(f"subsample must be one of {SUBSAMPLES}; got {subsample!r}")
    labels = list(range(num_classes))
    m = math.ceil(num_classes / 2)
    subset = {"all": labels, "base": labels[:m], "new": labels[m:]}[subsample]
    if not subset:
        raise ValueError(f"subsample {subsample!r} of a dataset with {num_classes} class(es) has no classes")
    return subset


def relabel(items: list[Item], kept: list[int]) -> list[Item]:
    """Keep the items of ``kept`` labels and renumber them 0..k-1 in ``kept`` order."""
    new_label = {old: new for new, old in enumerate(kept)}
    return [Item(it.path, new_label[it.label]) for it in items if it.label in new_label]
