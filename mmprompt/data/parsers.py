"""One parser per split format, all returning a `Catalog` with paths relative to the dataset folder.

Formats (docs/datasets.md, Layouts): CoOp's ``split_zhou_<Name>.json``; FGVCAircraft's ``images_variant_*.txt`` +
``variants.txt``; ImageNet's ``images/{train,val}/<wnid>/`` + ``classnames.txt``; and the test-only
ImageNet variants (V2 numeric folders, Sketch/A/R wnid folders).
"""

from __future__ import annotations

import posixpath
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .catalog import (
    SPLITS,
    Catalog,
    Item,
    classnames_from_entries,
    clean_classname,
    list_dirs,
    missing_file,
    read_json,
    require_dir,
    safe_relpath,
)
from .fewshot import FEWSHOT_DIR
from .listing import LISTING_FILE, FolderListing, gc_paused

if TYPE_CHECKING:
    from .registry import DatasetSpec

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
IMAGENET_FOLDER = "imagenet"
CLASSNAMES_FILE = "classnames.txt"


def entries_from_split_dict(data: Any, where: str) -> dict[str, list[tuple[str, int, str]]]:
    """Validate a ``{"train"|"val"|"test": [[path, label, classname], ...]}`` dict and return its
    entries with safe relative paths and int labels."""
    if not isinstance(data, dict) or not set(data) & set(SPLITS):
        raise ValueError(
            f"{where}: expected a JSON object with keys 'train', 'val' and/or 'test', each a list of "
            f"[relative_path, label, classname]; got {type(data).__name__} with keys "
            f"{sorted(data) if isinstance(data, dict) else '-'}"
        )
    unknown = set(data) - set(SPLITS)
    if unknown:
        raise ValueError(f"{where}: unknown split keys {sorted(unknown)}; allowed: {list(SPLITS)}")
    out: dict[str, list[tuple[str, int, str]]] = {}
    for split, rows in data.items():
        entries = []
        for i, row in enumerate(rows):
            if not (isinstance(row, (list, tuple)) and len(row) == 3 and isinstance(row[1], int)):
                raise ValueError(f"{where}: {split}[{i}] = {row!r} is not [relative_path, int_label, classname]")
            entries.append((safe_relpath(row[0], f"{where} {split}[{i}]"), int(row[1]), str(row[2])))
        out[split] = entries
    return out


def catalog_from_entries(
    entries: dict[str, list[tuple[str, int, str]]], where: str, prefix: str = "", renames: dict[str, str] | None = None
) -> Catalog:
    """Build a catalog from validated entries, prefixing each path with ``prefix`` (the image folder
    relative to the dataset folder)."""
    classnames = classnames_from_entries((e for rows in entries.values() for e in rows), where, renames)
    splits = {
        split: [Item(posixpath.join(prefix, path) if prefix else path, label) for path, label, _ in rows]
        for split, rows in entries.items()
    }
    return Catalog(classnames, splits)


def parse_zhou_split(dataset_dir: Path, spec: DatasetSpec) -> Catalog:
    """CoOp's ``split_zhou_<Name>.json``; paths relative to the image folder, except where the spec
    says they are relative to the dataset folder (StanfordCars)."""
    require_dir(dataset_dir, spec.layout)
    split_path = dataset_dir / spec.split_file
    data = read_json(split_path, f"{spec.name} split file", spec.layout)
    entries = entries_from_split_dict(data, str(split_path))
    prefix = "" if spec.paths_relative_to_dataset else spec.image_dir
    return catalog_from_entries(entries, str(split_path), prefix, spec.renames)


def read_lines(path: Path, what: str, layout: str = "") -> list[str]:
    """Non-empty stripped lines of a text file; error naming the file when it is missing."""
    if not path.is_file():
        raise missing_file(path, what, layout)
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def parse_fgvc_aircraft(dataset_dir: Path, spec: DatasetSpec) -> Catalog:
    """``variants.txt`` orders the 100 classes; ``images_variant_<split>.txt`` lines are
    ``<image id> <variant name with spaces>``, images at ``images/<id>.jpg``."""
    require_dir(dataset_dir, spec.layout)
    variants = read_lines(dataset_dir / "variants.txt", "FGVCAircraft class list", spec.layout)
    label_of = {name: i for i, name in enumerate(variants)}
    splits: dict[str, list[Item]] = {}
    for split in SPLITS:
        list_path = dataset_dir / f"images_variant_{split}.txt"
        items = []
        for line in read_lines(list_path, f"FGVCAircraft {split} list", spec.layout):
            image_id, _, variant = line.partition(" ")
            if variant not in label_of:
                raise ValueError(f"{list_path}: variant {variant!r} of image {image_id} is not in variants.txt")
            items.append(Item(f"{spec.image_dir}/{safe_relpath(image_id, str(list_path))}.jpg", label_of[variant]))
        splits[split] = items
    return Catalog(tuple(clean_classname(v, spec.renames) for v in variants), splits)


def read_imagenet_classnames(dataset_dir: Path, layout: str) -> dict[str, str]:
    """``wnid name`` lines of ``classnames.txt`` (ordered as in the file). The variants look in their
    own folder first, then in the sibling ``imagenet`` folder."""
    candidates = [dataset_dir / CLASSNAMES_FILE, dataset_dir.parent / IMAGENET_FOLDER / CLASSNAMES_FILE]
    for path in candidates:
        if path.is_file():
            table = {}
            for line in read_lines(path, "ImageNet class names"):
                wnid, _, name = line.partition(" ")
                if not name:
                    raise ValueError(f"{path}: line {line!r} is not '<wnid> <class name>'")
                table[wnid] = clean_classname(name)
            return table
    raise FileNotFoundError(
        f"ImageNet class names not found at {' or '.join(map(str, candidates))} "
        f"(copy classnames.txt from CoOp's DATASETS.md there)\nexpected layout:\n{layout}"
    )


def list_class_folders(base: Path, rel_dir: str, folder_labels: list[tuple[str, int]], layout: str,
                       listing: FolderListing | None = None) -> list[Item]:
    """Items of class-per-folder trees: every image in ``<rel_dir>/<folder>/`` gets that folder's
    label. A missing or empty folder is an error, never a silently smaller class. ``listing`` reuses
    the cached names of folders that did not change (`mmprompt.data.listing`)."""
    listing = listing or FolderListing(base, None, IMAGE_EXTENSIONS)
    items: list[Item] = []
    with gc_paused():
        for folder, label in folder_labels:
            rel = posixpath.join(rel_dir, folder) if rel_dir else folder
            require_dir(base / rel, layout)
            names = listing.files(rel)
            if not names:
                raise ValueError(f"class folder {base / rel} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
            prefix = rel + "/"
            items.extend([Item(prefix + name, label) for name in names])
    return items


def class_folder_items(dataset_dir: Path, splits: dict[str, str], folder_labels: list[tuple[str, int]],
                       layout: str) -> dict[str, list[Item]]:
    """``{split: items}`` of ``{split: folder holding the class folders}``, the listing read from and
    written to ``<dataset>/split_fewshot/listing.json`` (`FolderListing`): the ImageNet trees."""
    listing = FolderListing(dataset_dir, dataset_dir / FEWSHOT_DIR / LISTING_FILE, IMAGE_EXTENSIONS)
    items = {split: list_class_folders(dataset_dir, folder, folder_labels, layout, listing)
             for split, folder in splits.items()}
    listing.save()
    return items


def wnid_labels(classnames: dict[str, str]) -> list[tuple[str, int]]:
    """ImageNet labels follow the sorted wnids (what CoOp's sorted folder listing gives)."""
    return [(wnid, i) for i, wnid in enumerate(sorted(classnames))]


def parse_imagenet(dataset_dir: Path, spec: DatasetSpec) -> Catalog:
    """``images/train/<wnid>/`` is train, ``images/val/<wnid>/`` is test (and val, as in CoOp)."""
    require_dir(dataset_dir, spec.layout)
    table = read_imagenet_classnames(dataset_dir, spec.layout)
    labels = wnid_labels(table)
    folders = {"train": f"{spec.image_dir}/train", "test": f"{spec.image_dir}/val"}
    return Catalog(tuple(table[w] for w, _ in labels), class_folder_items(dataset_dir, folders, labels, spec.layout))


def parse_imagenet_v2(dataset_dir: Path, spec: DatasetSpec) -> Catalog:
    """ImageNetV2: folders ``0``..``999`` are labels in ``classnames.txt`` order; test only."""
    require_dir(dataset_dir, spec.layout)
    table = read_imagenet_classnames(dataset_dir, spec.layout)
    folders = [(str(i), i) for i in range(len(table))]
    return Catalog(tuple(table.values()), class_folder_items(dataset_dir, {"test": spec.image_dir}, folders, spec.layout))


def parse_imagenet_wnid_folders(dataset_dir: Path, spec: DatasetSpec) -> Catalog:
    """Sketch (1000 classes), A and R (200): ``<image_dir>/<wnid>/``, labelled by the sorted wnids
    present (CoOp's order); names from ``classnames.txt``. Test only."""
    image_root = require_dir(dataset_dir / spec.image_dir, spec.layout)
    table = read_imagenet_classnames(dataset_dir, spec.layout)
    wnids = list_dirs(image_root)
    unknown = [w for w in wnids if w not in table]
    if unknown or not wnids:
        raise ValueError(
            f"{image_root}: expected <wnid> folders listed in classnames.txt; "
            + (f"unknown folders {unknown[:10]}" if unknown else "found none")
        )
    folders = [(w, i) for i, w in enumerate(wnids)]
    return Catalog(tuple(table[w] for w in wnids),
                   class_folder_items(dataset_dir, {"test": spec.image_dir}, folders, spec.layout))
