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
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, NamedTuple

from PIL import Image

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


def write_json_atomic(path: Path, data: Any, indent: int | None = None) -> None:
    """Write JSON through a temporary file and ``os.replace`` so concurrent readers (other ranks)
    see either nothing or the whole file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=indent)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def open_rgb(path: Path) -> Image.Image:
    """Open an image as RGB; a missing or unreadable file raises an error naming it."""
    if not path.is_file():
        raise FileNotFoundError(f"image listed in the split does not exist: {path}")
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except Exception as err:  # PIL raises several types for corrupt files
        raise OSError(f"cannot read image {path}: {err}") from err


def require_dir(path: Path, layout: str) -> Path:
    """Return ``path`` if it is a folder, else raise naming it and the expected layout."""
    if not path.is_dir():
        raise FileNotFoundError(f"folder not found: {path}\nexpected layout:\n{layout}")
    return path


def list_dirs(path: Path) -> list[str]:
    """Sorted names of the non-hidden sub-folders (sorted so every machine labels alike)."""
    return sorted(p.name for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))


def list_files(path: Path) -> list[str]:
    """Sorted names of the non-hidden files in a folder."""
    return sorted(p.name for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
