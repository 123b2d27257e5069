"""Foreground masks in image pixel coordinates, one reader per annotation format, and the patch-grid
downsampling the attention statistics use.

Every reader returns a float32 array (H, W) in [0, 1] of the *original* image size (1 = object), or
``None`` when that image has no annotation (e.g. ImageNet train images have no boxes). A listed
annotation that exists but can't be read, or whose size differs from the image, is an error.

Coordinates: Cars, FGVCAircraft and ILSVRC boxes and Caltech101 contours are 1-based pixel indices
(MATLAB / PASCAL convention), boxes inclusive of both ends.
"""

from __future__ import annotations

import math
import posixpath
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

Size = tuple[int, int]  # (width, height), as PIL reports it


class MaskSource(Protocol):
    """Reads the foreground mask of one item (path relative to ``base_dir``) of image size ``size``."""

    def __call__(self, base_dir: Path, item_path: str, size: Size) -> np.ndarray | None: ...


def mask_to_patch_grid(mask: torch.Tensor, patch_size: int, threshold: float = 0.5) -> torch.Tensor:
    """Foreground patches of (N, H, W) masks as a bool (N, gh*gw) tensor in row-major patch order: a
    patch is foreground if its mean coverage is ≥ ``threshold`` (0.5 by default: at least half
    covered; docs/datasets.md, Foreground masks)."""
    if mask.dim() != 3:
        raise ValueError(f"mask must be (N, H, W), got shape {tuple(mask.shape)}")
    h, w = mask.shape[-2:]
    if h % patch_size or w % patch_size:
        raise ValueError(f"mask size {h}x{w} is not a multiple of patch_size {patch_size}")
    coverage = F.avg_pool2d(mask[:, None].float(), kernel_size=patch_size, stride=patch_size)
    return (coverage >= threshold - 1e-6).flatten(1)


def read_mask_image(path: Path, size: Size) -> Image.Image:
    """Open an annotation image, checking it has the image's size (a shifted mask is worse than none)."""
    try:
        with Image.open(path) as img:
            img.load()
            mask = img.copy()
    except Exception as err:
        raise OSError(f"cannot read mask {path}: {err}") from err
    if mask.size != size:
        raise ValueError(f"mask {path} is {mask.size[0]}x{mask.size[1]} but its image is {size[0]}x{size[1]} (W x H)")
    return mask


def nonzero_pixels(mask: Image.Image) -> np.ndarray:
    """1.0 where a mask image is non-zero. Single-band masks are read at their own depth (through
    ``convert("L")`` a 16-bit or float mask clips, and a float 0.4 rounds to 0)."""
    if len(mask.getbands()) == 1 and mask.mode != "P":
        return (np.asarray(mask) != 0).astype(np.float32)
    return (np.asarray(mask.convert("L")) > 0).astype(np.float32)


def boxes_to_mask(boxes: list[tuple[float, float, float, float]], size: Size) -> np.ndarray:
    """Union of boxes given as continuous 0-based edges (left, top, right, bottom): a pixel is inside
    when its centre is, so a 1-based inclusive box (x1..x2) covers columns x1-1..x2-1."""
    w, h = size
    mask = np.zeros((h, w), dtype=np.float32)
    for left, top, right, bottom in boxes:
        c1, r1 = max(math.ceil(left - 0.5), 0), max(math.ceil(top - 0.5), 0)
        c2, r2 = min(math.floor(right - 0.5), w - 1), min(math.floor(bottom - 0.5), h - 1)
        mask[r1 : r2 + 1, c1 : c2 + 1] = 1.0
    return mask


def edges_of_one_based(x1: float, y1: float, x2: float, y2: float) -> tuple[float, float, float, float]:
    """A 1-based inclusive pixel box (MATLAB/PASCAL) as continuous 0-based edges."""
    return x1 - 1, y1 - 1, x2, y2


def stem(path: str) -> str:
    return posixpath.splitext(posixpath.basename(path))[0]


class PetsTrimaps:
    """``annotations/trimaps/<stem>.png``: 1 = pet, 2 = background, 3 = border (kept as 0.5, so it
    counts half toward a patch's coverage)."""

    values = {1: 1.0, 2: 0.0, 3: 0.5}

    def __call__(self, base_dir: Path, item_path: str, size: Size) -> np.ndarray | None:
        path = base_dir / "annotations" / "trimaps" / f"{stem(item_path)}.png"
        if not path.is_file():
            return None
        trimap = np.asarray(read_mask_image(path, size))
        out = np.zeros(trimap.shape, dtype=np.float32)
        for value, weight in self.values.items():
            out[trimap == value] = weight
        return out


class CaltechContours:
    """``Annotations/<class>/annotation_XXXX.mat`` for ``101_ObjectCategories/<class>/image_XXXX.jpg``:
    ``obj_contour`` (2 x P: x row, y row) is relative to ``box_coord`` [y1 y2 x1 x2]; the polygon is
    rasterised. Four classes are named differently in Annotations (below)."""

    folders = {"Faces": "Faces_2", "Faces_easy": "Faces_3", "airplanes": "Airplanes_Side_2", "Motorbikes": "Motorbikes_16"}

    def __call__(self, base_dir: Path, item_path: str, size: Size) -> np.ndarray | None:
        from scipy.io import loadmat

        cls = posixpath.basename(posixpath.dirname(item_path))
        number = stem(item_path).rpartition("_")[2]
        path = base_dir / "Annotations" / self.folders.get(cls, cls) / f"annotation_{number}.mat"
        if not path.is_file():
            return None
        try:
            mat = loadmat(str(path))
            box = np.asarray(mat["box_coord"], dtype=np.float64).ravel()
            contour = np.asarray(mat["obj_contour"], dtype=np.float64)
        except Exception as err:
            raise OSError(f"cannot read Caltech101 contour {path} (needs box_coord and obj_contour): {err}") from err
        xs, ys = contour[0] + box[2] - 1, contour[1] + box[0] - 1
        canvas = Image.new("L", size, 0)
        ImageDraw.Draw(canvas).polygon(list(zip(xs.tolist(), ys.tolist())), fill=1, outline=1)
        return np.asarray(canvas, dtype=np.float32)


class FlowersSegmentations:
    """``segmim/segmim_XXXXX.jpg`` for ``jpg/image_XXXXX.jpg``: background is painted pure blue
    (≈ (0, 0, 254)); JPEG noise is absorbed by thresholds."""

    def __call__(self, base_dir: Path, item_path: str, size: Size) -> np.ndarray | None:
        number = stem(item_path).rpartition("_")[2]
        path = base_dir / "segmim" / f"segmim_{number}.jpg"
        if not path.is_file():
            return None
        rgb = np.asarray(read_mask_image(path, size).convert("RGB")).astype(np.int16)
        background = (rgb[..., 2] >= 180) & (rgb[..., 0] <= 70) & (rgb[..., 1] <= 70)
        return (~background).astype(np.float32)


class IndexedBoxes:
    """Boxes looked up by a key derived from the item path; the index is read once per process."""

    def __init__(self) -> None:
        self._index: dict[str, list[tuple[float, float, float, float]]] | None = None

    def load_index(self, base_dir: Path) -> dict[str, list[tuple[float, float, float, float]]]:
        raise NotImplementedError

    def key(self, item_path: str) -> str:
        raise NotImplementedError

    def __call__(self, base_dir: Path, item_path: str, size: Size) -> np.ndarray | None:
        if self._index is None:
            self._index = self.load_index(base_dir)
        boxes = self._index.get(self.key(item_path))
        return None if boxes is None else boxes_to_mask([edges_of_one_based(*b) for b in boxes], size)


class CarsBoxes(IndexedBoxes):
    """StanfordCars: ``devkit/cars_train_annos.mat`` for ``cars_train/`` and
    ``cars_test_annos_withlabels.mat`` (dataset folder, or ``devkit/``) for ``cars_test/``; fields
    ``fname``, ``bbox_x1``, ``bbox_y1``, ``bbox_x2``, ``bbox_y2``."""

    files = {"cars_train": ["devkit/cars_train_annos.mat"],
             "cars_test": ["cars_test_annos_withlabels.mat", "devkit/cars_test_annos_withlabels.mat"]}

    def load_index(self, base_dir: Path) -> dict[str, list[tuple[float, float, float, float]]]:
        from scipy.io import loadmat

        index: dict[str, list[tuple[float, float, float, float]]] = {}
        for folder, candidates in self.files.items():
            path = next((base_dir / c for c in candidates if (base_dir / c).is_file()), None)
            if path is None:
                continue
            try:
                annos = loadmat(str(path), squeeze_me=True)["annotations"]
                for a in np.atleast_1d(annos):
                    box = tuple(float(a[k]) for k in ("bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2"))
                    index[f"{folder}/{a['fname']}"] = [box]
            except Exception as err:
                raise OSError(f"cannot read StanfordCars boxes {path}: {err}") from err
        return index

    def key(self, item_path: str) -> str:
        return item_path


class AircraftBoxes(IndexedBoxes):
    """FGVCAircraft: ``images_box.txt`` lines ``<image id> xmin ymin xmax ymax``."""

    def load_index(self, base_dir: Path) -> dict[str, list[tuple[float, float, float, float]]]:
        path = base_dir / "images_box.txt"
        if not path.is_file():
            return {}
        index = {}
        for line in path.read_text(encoding="utf-8").split("\n"):
            fields = line.split()
            if not fields:
                continue
            if len(fields) != 5:
                raise ValueError(f"{path}: line {line!r} is not '<id> xmin ymin xmax ymax'")
            index[fields[0]] = [tuple(float(v) for v in fields[1:])]
        return index

    def key(self, item_path: str) -> str:
        return stem(item_path)


class ImageNetValBoxes:
    """ImageNet val: ILSVRC PASCAL-style XML at ``bboxes/val/<stem>.xml`` (``size/width,height`` and
    ``object/bndbox/{xmin,ymin,xmax,ymax}``); the union of all objects' boxes, rescaled when the XML
    size differs from the stored image (resized copies of ImageNet)."""

    def __call__(self, base_dir: Path, item_path: str, size: Size) -> np.ndarray | None:
        if "/val/" not in f"/{item_path}":
            return None
        path = base_dir / "bboxes" / "val" / f"{stem(item_path)}.xml"
        if not path.is_file():
            return None
        try:
            root = ET.parse(path).getroot()
            xml_w = float(root.findtext("size/width") or size[0])
            xml_h = float(root.findtext("size/height") or size[1])
            boxes = [
                tuple(float(obj.findtext(f"bndbox/{k}")) for k in ("xmin", "ymin", "xmax", "ymax"))
                for obj in root.iter("object")
            ]
        except Exception as err:
            raise OSError(f"cannot read ImageNet box file {path}: {err}") from err
        sx, sy = size[0] / xml_w, size[1] / xml_h
        edges = [edges_of_one_based(*box) for box in boxes]
        return boxes_to_mask([(l * sx, t * sy, r * sx, b * sy) for l, t, r, b in edges], size)


class ParallelMaskFolder:
    """Masks as images in a folder parallel to the image folder: the image's path relative to
    ``image_prefix`` under ``mask_root`` (same name, or same stem with ``.png``); non-zero pixels are
    foreground. ``required``: a missing mask is an error (synthetic data) rather than "no mask"."""

    def __init__(self, mask_root: str | Path, image_prefix: str = "", required: bool = False) -> None:
        self.mask_root, self.image_prefix, self.required = str(mask_root), image_prefix, required

    def mask_path(self, base_dir: Path, item_path: str) -> Path | None:
        rel = posixpath.relpath(item_path, self.image_prefix) if self.image_prefix else item_path
        root = base_dir / self.mask_root
        for candidate in (root / rel, root / f"{posixpath.splitext(rel)[0]}.png"):
            if candidate.is_file():
                return candidate
        if self.required:
            raise FileNotFoundError(f"mask for {item_path} not found: expected {root / rel} (or .png)")
        return None

    def __call__(self, base_dir: Path, item_path: str, size: Size) -> np.ndarray | None:
        path = self.mask_path(base_dir, item_path)
        if path is None:
            return None
        return nonzero_pixels(read_mask_image(path, size))
