"""Built-in synthetic data in the CoOp on-disk layout, so the demo and the tests run with no download.

Ten classes, each a distinct shape AND colour ("circle" is red, "square" green, ...), drawn large
(so even a random-weight tiny CLIP's pooled feature carries the class) at a random position, size
and rotation on a low-saturation noise/gradient/stripe background, with the exact foreground mask
saved beside each image. ``synthetic-shifted`` uses other background families (checkerboards,
blobs), saturated background colours and a colour cast on the objects, so a model adapted on
``synthetic`` has a domain shift to be tested on.

Generation is deterministic (one numpy RNG per image, seeded by variant, class and index) and atomic
(built in a hidden temporary folder under the root, then renamed), so concurrent ranks never see
half a tree.
"""

from __future__ import annotations

import hashlib
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
from PIL import Image, ImageDraw

from ..files import make_temp_dir

IMAGE_SIZE = 96
OBJECT_RADIUS = (0.25, 0.4)  # fraction of the image side
SPLIT_SIZES = {"train": 20, "val": 8, "test": 20}

#: class name → (RGB colour, shape drawer name); shapes and colours are both distinct per class.
CLASSES: dict[str, tuple[tuple[int, int, int], str]] = {
    "circle": ((220, 30, 30), "circle"),
    "square": ((30, 170, 40), "square"),
    "triangle": ((30, 60, 225), "triangle"),
    "star": ((240, 215, 30), "star"),
    "cross": ((210, 40, 200), "cross"),
    "ring": ((30, 210, 215), "ring"),
    "hexagon": ((245, 110, 10), "hexagon"),
    "diamond": ((120, 45, 170), "diamond"),
    "crescent": ((245, 245, 245), "crescent"),
    "arrow": ((25, 25, 25), "arrow"),
}


@dataclass(frozen=True)
class SyntheticVariant:
    """One synthetic dataset: its folder, split-file name, background families, background colour
    spread (``chroma``: std of the colour around a grey level) and object colour cast."""

    folder: str
    split_name: str
    backgrounds: tuple[str, ...]
    chroma: float
    colour_gain: tuple[float, float, float]
    seed: int

    @property
    def split_file(self) -> str:
        return f"split_zhou_{self.split_name}.json"

    @property
    def classnames(self) -> tuple[str, ...]:
        return tuple(CLASSES)

    @property
    def split_sizes(self) -> dict[str, int]:
        return SPLIT_SIZES

    def render(self, class_index: int, index: int) -> tuple[Image.Image, Image.Image]:
        return render(self, class_index, index)


class GeneratedDataset(Protocol):
    """What `generate_synthetic` needs of a generated dataset: where it goes, its classes and a renderer."""

    folder: str

    @property
    def split_file(self) -> str: ...

    @property
    def classnames(self) -> tuple[str, ...]: ...

    @property
    def split_sizes(self) -> dict[str, int]: ...

    def render(self, class_index: int, index: int) -> tuple[Image.Image, Image.Image]: ...


SYNTHETIC_VARIANTS = (
    SyntheticVariant("synthetic", "Synthetic", ("noise", "gradient", "stripes"), 12.0, (1.0, 1.0, 1.0), 0),
    SyntheticVariant("synthetic-shifted", "SyntheticShifted", ("checker", "blobs"), 50.0, (0.75, 0.9, 1.15), 1),
)


def polygon(cx: float, cy: float, r: float, n: int, angle: float, radii: tuple[float, ...] = (1.0,)) -> list[tuple[float, float]]:
    """Vertices of a regular (or, with alternating ``radii``, star-shaped) polygon."""
    return [
        (cx + r * radii[i % len(radii)] * math.cos(angle + 2 * math.pi * i / n),
         cy + r * radii[i % len(radii)] * math.sin(angle + 2 * math.pi * i / n))
        for i in range(n)
    ]


def rotate(points: list[tuple[float, float]], cx: float, cy: float, angle: float) -> list[tuple[float, float]]:
    c, s = math.cos(angle), math.sin(angle)
    return [(cx + (x - cx) * c - (y - cy) * s, cy + (x - cx) * s + (y - cy) * c) for x, y in points]


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, angle: float) -> None:
    """Paint ``shape`` with value 1 (and holes with 0) on a mask canvas."""
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == "circle":
        draw.ellipse(box, fill=1)
    elif shape == "ring":
        draw.ellipse(box, fill=1)
        draw.ellipse((cx - 0.55 * r, cy - 0.55 * r, cx + 0.55 * r, cy + 0.55 * r), fill=0)
    elif shape == "crescent":
        draw.ellipse(box, fill=1)
        dx, dy = 0.5 * r * math.cos(angle), 0.5 * r * math.sin(angle)
        draw.ellipse((cx - r + dx, cy - r + dy, cx + r + dx, cy + r + dy), fill=0)
    elif shape in ("square", "triangle", "hexagon", "diamond", "star"):
        sides, radii = {"square": (4, (1.0,)), "triangle": (3, (1.0,)), "hexagon": (6, (1.0,)),
                        "diamond": (4, (1.0, 0.55)), "star": (10, (1.0, 0.45))}[shape]
        draw.polygon(polygon(cx, cy, r, sides, angle, radii), fill=1)
    elif shape == "cross":
        t = 0.33 * r
        for pts in ([(cx - r, cy - t), (cx + r, cy - t), (cx + r, cy + t), (cx - r, cy + t)],
                    [(cx - t, cy - r), (cx + t, cy - r), (cx + t, cy + r), (cx - t, cy + r)]):
            draw.polygon(rotate(pts, cx, cy, angle), fill=1)
    elif shape == "arrow":
        pts = [(cx - r, cy - 0.25 * r), (cx + 0.1 * r, cy - 0.25 * r), (cx + 0.1 * r, cy - 0.7 * r), (cx + r, cy),
               (cx + 0.1 * r, cy + 0.7 * r), (cx + 0.1 * r, cy + 0.25 * r), (cx - r, cy + 0.25 * r)]
        draw.polygon(rotate(pts, cx, cy, angle), fill=1)
    else:
        raise ValueError(f"unknown synthetic shape {shape!r}")


def background_colour(rng: np.random.Generator, chroma: float) -> np.ndarray:
    """A grey level plus a colour deviation of std ``chroma`` (0 = grey)."""
    return rng.uniform(40, 200) + rng.normal(0, chroma, 3)


def background(kind: str, rng: np.random.Generator, size: int, chroma: float) -> np.ndarray:
    """A (size, size, 3) float background in [0, 255] of the given family."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    c1, c2 = background_colour(rng, chroma), background_colour(rng, chroma)
    if kind == "noise":
        return c1 + rng.normal(0, 25, (size, size, 3))
    if kind == "gradient":
        t = (np.cos(rng.uniform(0, 2 * np.pi)) * xx + np.sin(rng.uniform(0, 2 * np.pi)) * yy)[..., None]
        t = (t - t.min()) / (np.ptp(t) + 1e-6)
        return c1 * (1 - t) + c2 * t
    if kind == "stripes":
        t = (np.sin(2 * np.pi * rng.uniform(2, 6) * (xx + rng.uniform(0, 1) * yy)) > 0)[..., None]
        return np.where(t, c1, c2)
    if kind == "checker":
        cells = int(rng.integers(4, 12))
        t = (((xx * cells).astype(int) + (yy * cells).astype(int)) % 2 == 0)[..., None]
        return np.where(t, c1, c2) + rng.normal(0, 10, (size, size, 3))
    if kind == "blobs":
        out = np.broadcast_to(c1, (size, size, 3)).copy()
        for _ in range(6):
            bx, by, br = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.1, 0.3)
            out[(xx - bx) ** 2 + (yy - by) ** 2 < br**2] = background_colour(rng, chroma)
        return out
    raise ValueError(f"unknown background {kind!r}")


def render(variant: SyntheticVariant, class_index: int, index: int) -> tuple[Image.Image, Image.Image]:
    """One image and its exact mask (0/255), deterministic in (variant, class, index)."""
    rng = np.random.default_rng([variant.seed, class_index, index])
    colour, shape = list(CLASSES.values())[class_index]
    size = IMAGE_SIZE
    r = rng.uniform(*OBJECT_RADIUS) * size
    cx, cy = rng.uniform(r, size - r), rng.uniform(r, size - r)
    canvas = Image.new("L", (size, size), 0)
    draw_shape(ImageDraw.Draw(canvas), shape, cx, cy, r, rng.uniform(0, 2 * math.pi))
    mask = np.asarray(canvas, dtype=bool)
    bg = background(variant.backgrounds[int(rng.integers(len(variant.backgrounds)))], rng, size, variant.chroma)
    fg = np.asarray(colour, dtype=np.float32) * np.asarray(variant.colour_gain) + rng.normal(0, 8, (size, size, 3))
    pixels = np.clip(np.where(mask[..., None], fg, bg), 0, 255).astype(np.uint8)
    return Image.fromarray(pixels, "RGB"), Image.fromarray(mask.astype(np.uint8) * 255, "L")


def write_tree(target: Path, variant: GeneratedDataset) -> None:
    """Write images, masks and the split file of ``variant`` into ``target``."""
    from .catalog import write_json_atomic

    split: dict[str, list[list]] = {name: [] for name in variant.split_sizes}
    for label, name in enumerate(variant.classnames):
        (target / "images" / name).mkdir(parents=True)
        (target / "masks" / name).mkdir(parents=True)
        index = 0
        for split_name, count in variant.split_sizes.items():
            for _ in range(count):
                image, mask = variant.render(label, index)
                rel = f"{name}/{name}_{index:04d}.png"
                image.save(target / "images" / rel, compress_level=1)
                mask.save(target / "masks" / rel, compress_level=1)
                split[split_name].append([rel, label, name])
                index += 1
    (target / RENDERING_FILE).write_text(rendering_fingerprint(variant) + "\n")
    write_json_atomic(target / variant.split_file, split)


#: beside the split file of a generated tree: which rendering wrote it (a changed dataset definition must
#: not be read from a tree an earlier definition left under the same folder name)
RENDERING_FILE = "rendering.txt"


def rendering_fingerprint(variant: GeneratedDataset) -> str:
    """A digest of everything that decides the images: the variant's full definition (classes, style, seed,
    sizes; the generated datasets are frozen dataclasses, so their repr is exact)."""
    return hashlib.sha256(repr(variant).encode()).hexdigest()[:16]


def check_rendering(target: Path, variant: GeneratedDataset) -> None:
    """Refuse a complete tree that an earlier definition of ``variant`` wrote, naming the folder."""
    stamp = target / RENDERING_FILE
    found = stamp.read_text().strip() if stamp.is_file() else "none (written before trees were stamped)"
    if found != rendering_fingerprint(variant):
        raise ValueError(
            f"generated data at {target} was written by another definition of {variant.folder!r} "
            f"({RENDERING_FILE}: {found}, expected {rendering_fingerprint(variant)}): remove the folder and "
            "it is generated again on first use")


def generate_synthetic(root: str | Path, variant: GeneratedDataset = SYNTHETIC_VARIANTS[0]) -> Path:
    """Create ``<root>/<variant.folder>`` unless it is already complete; return it."""
    root = Path(root)
    target = root / variant.folder
    if (target / variant.split_file).is_file():
        check_rendering(target, variant)
        return target
    root.mkdir(parents=True, exist_ok=True)
    tmp = make_temp_dir(root, prefix=f".{variant.folder}-")
    try:
        write_tree(tmp, variant)
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / variant.split_file).is_file():  # not a concurrent rank that won the race
                raise FileExistsError(
                    f"cannot create synthetic data at {target}: the folder exists without "
                    f"{variant.split_file}; remove it to regenerate"
                ) from None
            check_rendering(target, variant)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
