"""What a dataset tree lists: items (relative path + label), the ordered class names, and the IO
helpers every parser shares (safe relative paths, JSON, atomic writes, opening images).

Paths inside a `Catalog` are POSIX strings relative to the dataset's *base folder* (the dataset
folder under the data root, or the custom ``image_dir``), so catalogs and few-shot caches are
portable between machines.
"""

from __future__ import annotations

import json
import os
import posixpath
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, NamedTuple

import numpy as np
from PIL import Image

from ..files import UnreadableFile
from ..tables import write_json_atomic  # the one JSON writer; fewshot, custom and synthetic import it from here

SPLITS = ("train", "val", "test")


class Item(NamedTuple):
    """One image: ``path`` relative to the dataset's base folder, ``label`` 0-based."""

    path: str
    label: int


@dataclass(frozen=True)
class Catalog:
    """Everything a dataset tree lists, before few-shot sampling and base/novel selection.

    ``classnames`` are cleaned and ordered by label. ``splits`` maps "train"/"val"/"test" to items;
    a split that the dataset does not have is absent (ImageNet has no val: it validates on test,
    as CoOp does; the ImageNet variants only have test).
    """

    classnames: tuple[str, ...]
    splits: dict[str, list[Item]] = field(default_factory=dict)

    def split(self, name: str) -> list[Item]:
        """The items of ``name``; ImageNet-style catalogs without "val" validate on "test"."""
        if name == "val" and "val" not in self.splits:
            name = "test"
        if name not in self.splits:
            raise ValueError(f"this dataset has no {name!r} split (it has: {sorted(self.splits)})")
        return self.splits[name]


def clean_classname(name: str, renames: dict[str, str] | None = None) -> str:
    """CoOp's cleaning: the dataset's renames (e.g. EuroSAT "AnnualCrop" → "Annual Crop Land"), then
    "_" → space, whitespace collapsed."""
    name = (renames or {}).get(name, name)
    return " ".join(name.replace("_", " ").split())


def safe_relpath(path: str, where: str) -> str:
    """Normalise a listed relative path and refuse absolute paths or ones escaping the base folder,
    so a split file can never make the loader read outside the dataset."""
    rel = str(path).replace("\\", "/")
    norm = posixpath.normpath(rel)
    if posixpath.isabs(rel) or norm == ".." or norm.startswith("../") or Path(rel).is_absolute():
        raise ValueError(
            f"{where}: path {path!r} is absolute or escapes the image folder; split files must list "
            "paths relative to the image folder (e.g. 'cat/0001.jpg')"
        )
    return norm


def classnames_from_entries(
    entries: Iterable[tuple[str, int, str]], where: str, renames: dict[str, str] | None = None
) -> tuple[str, ...]:
    """Class names ordered by label from ``(path, label, classname)`` entries, checking that every
    label has exactly one name, every name one label, and labels cover 0..n-1 without a gap."""
    by_label: dict[int, tuple[str, str]] = {}
    by_name: dict[str, tuple[int, str]] = {}
    for path, label, name in entries:
        seen = by_label.setdefault(label, (name, path))
        if seen[0] != name:
            raise ValueError(
                f"{where}: label {label} is called {seen[0]!r} at {seen[1]!r} but {name!r} at {path!r}; "
                "each label must have one class name"
            )
        seen_label = by_name.setdefault(name, (label, path))
        if seen_label[0] != label:
            raise ValueError(
                f"{where}: class {name!r} has label {seen_label[0]} at {seen_label[1]!r} but {label} at "
                f"{path!r}; each class name must have one label"
            )
    if not by_label:
        raise ValueError(f"{where}: no entries; expected {{'train'|'val'|'test': [[path, label, classname], ...]}}")
    missing = sorted(set(range(max(by_label) + 1)) - set(by_label))
    if missing or min(by_label) < 0:
        raise ValueError(
            f"{where}: labels must be 0..{max(by_label)} with every class present; labels without any "
            f"entry (empty classes): {missing[:20]}" + (" (negative labels found)" if min(by_label) < 0 else "")
        )
    return tuple(clean_classname(by_label[i][0], renames) for i in range(len(by_label)))


def missing_file(path: Path, what: str, layout: str = "") -> FileNotFoundError:
    """The error for a file the layout requires: its path, and the layout when known."""
    return FileNotFoundError(f"{what} not found: {path}" + (f"\nexpected layout:\n{layout}" if layout else ""))


def read_json(path: Path, what: str, layout: str = "") -> Any:
    """Read JSON, turning a missing or malformed file into an error naming it and what it should be."""
    if not path.is_file():
        raise missing_file(path, what, layout)
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as err:
        raise ValueError(f"{what} {path} is not valid JSON: {err}") from err


#: Pillow's 16-bit integer modes (a 16-bit grayscale PNG opens as "I;16")
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


def scale_to_uint8(pixels: np.ndarray, mode: str) -> np.ndarray:
    """Map a single-band image with more than 8 bits to 0..255.

    16-bit modes scale by their bit depth (65535 → 255), so a dark 16-bit image stays dark. ``I``
    (32-bit int) and ``F`` (float) carry no depth of their own: non-negative values scale by the
    smallest of the ranges [0, 1] (float only), [0, 255] and [0, 65535] that holds them (the usual
    ways such files are written); anything else (negative values, larger ones) is stretched from
    its minimum to its maximum.
    """
    values = pixels.astype(np.float64)
    if mode in SIXTEEN_BIT_MODES:
        top = 65535.0
    else:
        low, high = float(values.min(initial=0.0)), float(values.max(initial=0.0))
        ranges = ((1.0,) if mode == "F" else ()) + (255.0, 65535.0)
        top = next((r for r in ranges if low >= 0 and high <= r), None)
        if top is None:
            values, top = values - low, max(high - low, 1e-12)
    return np.clip(np.rint(values * (255.0 / top)), 0, 255).astype(np.uint8)


def to_rgb(img: Image.Image) -> Image.Image:
    """Any image Pillow reads as 8-bit RGB. Pillow's own ``convert("RGB")`` clips 16/32-bit and
    float images at 255 (a 16-bit PNG comes out solid white), so those are rescaled first
    (`scale_to_uint8`); alpha is dropped, palettes and CMYK go through Pillow."""
    if img.mode in (*SIXTEEN_BIT_MODES, "I", "F"):
        img = Image.fromarray(scale_to_uint8(np.asarray(img), img.mode), "L")
    return img.convert("RGB")


def open_rgb(path: Path, dataset: str = "") -> Image.Image:
    """Open an image as RGB (`to_rgb`); a missing or unreadable (e.g. truncated) file raises an
    error naming it and, when given, the dataset that lists it."""
    listed_by = f" (listed by dataset {dataset})" if dataset else ""
    if not path.is_file():
        raise FileNotFoundError(f"image listed in the split does not exist: {path}{listed_by}")
    try:
        with Image.open(path) as img:
            return to_rgb(img)
    except Exception as err:  # PIL raises several types for corrupt files
        raise UnreadableFile(
            f"cannot read image {path}{listed_by}: {err}. Replace the file (is it truncated or corrupt?) or "
            "remove it from the split file; mmprompt check-data lists every such file"
        ) from err


def require_files(base_dir: Path, items: Iterable[Item], where: str, shown: int = 5) -> None:
    """Stat every listed image now, so a missing file stops the run before training, not mid-epoch;
    the error names the first ``shown`` missing paths and how many there are."""
    missing = [item.path for item in items if not (base_dir / item.path).is_file()]
    if missing:
        listed = "\n".join(f"  {base_dir / path}" for path in missing[:shown])
        more = f"\n  ... and {len(missing) - shown} more" if len(missing) > shown else ""
        raise FileNotFoundError(
            f"{where}: {len(missing)} image(s) listed in the split do not exist under {base_dir}:\n{listed}{more}\n"
            "restore them or remove them from the split file (mmprompt check-data lists every problem)"
        )


def require_dir(path: Path, layout: str) -> Path:
    """Return ``path`` if it is a folder, else raise naming it and the expected layout."""
    if not path.is_dir():
        raise FileNotFoundError(f"folder not found: {path}\nexpected layout:\n{layout}")
    return path


def list_dirs(path: Path) -> list[str]:
    """Sorted names of the non-hidden sub-folders (sorted so every machine labels alike)."""
    with os.scandir(path) as entries:
        return sorted(entry.name for entry in entries if not entry.name.startswith(".") and entry.is_dir())


def list_files(path: Path) -> list[str]:
    """Sorted names of the non-hidden files in a folder: one ``scandir`` pass, whose entries know their
    type without a ``stat`` per file (10x faster on ImageNet's 1.28M files, docs/datasets.md)."""
    with os.scandir(path) as entries:
        return sorted(entry.name for entry in entries if not entry.name.startswith(".") and entry.is_file())
