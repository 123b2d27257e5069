"""The captioned world: procedurally generated images + captions to pretrain a tiny CLIP on CPU, and the
shifted few-shot dataset (``world-shapes``) to adapt it on.

Every image holds one named object (a shape kind in a colour, small or large, somewhere, rotated) on a
background of one family, plus 0-3 small unnamed distractors; its mask is the named object alone. A caption
names some of the attributes ("a photo of a small red star on a striped background"), each left out at
random, so the text tower must learn the words and how they combine. Everything is a pure function of
``(seed, index)``: nothing is downloaded or stored, and a resumed run sees the same stream.

``world-shapes`` draws the same shape kinds under another distribution (backgrounds held out of
pretraining, outline-only objects, a colour cast): zero-shot transfer works but is imperfect, as with
EuroSAT for real CLIP, and the shift is systematic, so few-shot learning has something to fix.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from .synthetic import draw_shape, polygon

SHAPES = ("arrow", "bar", "circle", "crescent", "cross", "diamond", "heart", "hexagon", "ring", "square", "star",
          "triangle")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 30, 30), "green": (30, 165, 45), "blue": (35, 65, 225), "yellow": (240, 215, 30),
    "purple": (135, 45, 185), "orange": (245, 125, 15), "pink": (250, 125, 195), "cyan": (35, 210, 215),
    "white": (245, 245, 245), "black": (20, 20, 20), "brown": (125, 75, 30), "gray": (128, 128, 128),
}
#: background family -> the word captions use for it
PRETRAIN_BACKGROUNDS = {"flat": "plain", "gradient": "gradient", "stripes": "striped", "checks": "checkered",
                        "noise": "noisy", "clutter": "cluttered"}
SHIFTED_BACKGROUNDS = ("dots", "waves")  # held out of pretraining
SIZES = {"small": (0.2, 0.28), "large": (0.32, 0.45)}  # object radius as a fraction of the image side
#: each shape's upright drawing angle (triangles and stars point up, squares and crosses sit on an edge,
#: diamonds stand tall, arrows point right); objects are tilted from it by at most MAX_TILT
UPRIGHT = {"triangle": -math.pi / 2, "star": -math.pi / 2, "square": math.pi / 4, "diamond": math.pi / 2}
MAX_TILT = math.pi / 6
SUPERSAMPLE = 2


@dataclass(frozen=True)
class Scene:
    """What one image shows; the caption is written from it."""

    shape: str
    colour: str
    size: str
    background: str
    position: str
    distractors: int


def luminance(rgb: tuple[int, int, int] | np.ndarray) -> float:
    r, g, b = (float(c) for c in rgb)
    return 0.299 * r + 0.587 * g + 0.114 * b


def position_words(cx: float, cy: float) -> str:
    """"top left", "center", "bottom" ... from the object centre in [0, 1]²."""
    row = ("top", "", "bottom")[min(int(cy * 3), 2)]
    col = ("left", "", "right")[min(int(cx * 3), 2)]
    return " ".join(word for word in (row, col) if word) or "center"


def background_rgb(rng: np.random.Generator, avoid: float, chroma: float = 14.0) -> np.ndarray:
    """A low-saturation colour whose brightness is at least 70 away from the object's (so it stays visible)."""
    levels = np.arange(30, 226, 5)
    levels = levels[np.abs(levels - avoid) >= 70]
    return float(rng.choice(levels)) + rng.normal(0, chroma, 3)


def paint_background(kind: str, rng: np.random.Generator, size: int, avoid: float) -> np.ndarray:
    """A (size, size, 3) float image of one background family."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    c1, c2 = background_rgb(rng, avoid), background_rgb(rng, avoid)
    if kind == "flat":
        return np.broadcast_to(c1, (size, size, 3)).copy()
    if kind == "gradient":
        angle = rng.uniform(0, 2 * np.pi)
        t = (np.cos(angle) * xx + np.sin(angle) * yy)[..., None]
        t = (t - t.min()) / (np.ptp(t) + 1e-6)
        return c1 * (1 - t) + c2 * t
    if kind == "stripes":
        angle = rng.uniform(0, np.pi)
        t = np.sin(2 * np.pi * rng.uniform(3, 7) * (np.cos(angle) * xx + np.sin(angle) * yy))[..., None] > 0
        return np.where(t, c1, c2)
    if kind == "checks":
        cells = int(rng.integers(4, 10))
        t = (((xx * cells).astype(int) + (yy * cells).astype(int)) % 2 == 0)[..., None]
        return np.where(t, c1, c2)
    if kind == "noise":
        return c1 + rng.normal(0, 28, (size, size, 3))
    if kind == "clutter":
        out = Image.fromarray(np.clip(np.broadcast_to(c1, (size, size, 3)), 0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(out)
        for _ in range(int(rng.integers(8, 16))):
            x0, y0 = rng.uniform(0, size, 2)
            x1, y1 = x0 + rng.uniform(-0.3, 0.3) * size, y0 + rng.uniform(-0.3, 0.3) * size
            draw.line((x0, y0, x1, y1), fill=tuple(int(v) for v in np.clip(background_rgb(rng, avoid), 0, 255)),
                      width=int(rng.integers(1, 4)))
        return np.asarray(out, dtype=np.float32)
    if kind == "dots":
        out = np.broadcast_to(c1, (size, size, 3)).copy()
        spacing = rng.uniform(0.12, 0.2)
        fx, fy = (xx / spacing) % 1 - 0.5, (yy / spacing) % 1 - 0.5
        out[fx**2 + fy**2 < 0.08] = c2
        return out
    if kind == "waves":
        t = np.sin(2 * np.pi * (rng.uniform(2, 4) * xx + 0.15 * np.sin(2 * np.pi * rng.uniform(2, 4) * yy)))
        t = ((t + 1) / 2)[..., None]
        return c1 * (1 - t) + c2 * t
    raise ValueError(f"unknown background family {kind!r}")


def draw_world_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, angle: float) -> None:
    """The synthetic data's shapes plus the world's own (heart, bar), painted with value 1."""
    if shape == "heart":
        lobe = 0.5 * r
        points = [(cx, cy + r)]
        points += polygon(cx - lobe, cy - 0.2 * r, lobe, 12, math.pi * 0.75)[:8]
        points += polygon(cx + lobe, cy - 0.2 * r, lobe, 12, math.pi * 1.25)[:8]
        c, s = math.cos(angle), math.sin(angle)
        draw.polygon([(cx + (x - cx) * c - (y - cy) * s, cy + (x - cx) * s + (y - cy) * c) for x, y in points], fill=1)
    elif shape == "bar":
        t = 0.28 * r
        corners = [(-r, -t), (r, -t), (r, t), (-r, t)]
        c, s = math.cos(angle), math.sin(angle)
        draw.polygon([(cx + x * c - y * s, cy + x * s + y * c) for x, y in corners], fill=1)
    else:
        draw_shape(draw, shape, cx, cy, r, angle)


def shape_mask(shape: str, cx: float, cy: float, r: float, angle: float, size: int) -> np.ndarray:
    """Coverage in [0, 1] of ``shape`` on a (size, size) grid, drawn at SUPERSAMPLE× and box-averaged."""
    big = size * SUPERSAMPLE
    canvas = Image.new("L", (big, big), 0)
    draw_world_shape(ImageDraw.Draw(canvas), shape, cx * SUPERSAMPLE, cy * SUPERSAMPLE, r * SUPERSAMPLE, angle)
    coverage = np.asarray(canvas, dtype=np.float32).reshape(size, SUPERSAMPLE, size, SUPERSAMPLE).mean(axis=(1, 3))
    return coverage


@dataclass(frozen=True)
class WorldStyle:
    """How objects are drawn: the pretraining look, or the shifted one of ``world-shapes``."""

    backgrounds: tuple[str, ...]
    colour_cast: tuple[float, float, float] = (1.0, 1.0, 1.0)
    hatched: bool = False  # objects filled with stripes of their colour and a darker shade
    outline: float = 0.0  # > 0: only a band of this fraction of the radius is drawn (mask = the band)
    scale: float = 1.0  # the named object's radius is SIZES × scale (small objects in clutter: < 1)
    distractors: tuple[int, int] = (0, 4)  # how many small unnamed shapes: integers in [low, high)
    colour_jitter: float = 0.0  # std of a per-image shift of the object's RGB (near-neighbour colours overlap)


PRETRAIN_STYLE = WorldStyle(tuple(PRETRAIN_BACKGROUNDS))
SHIFTED_STYLE = WorldStyle(SHIFTED_BACKGROUNDS, colour_cast=(1.1, 0.95, 0.75), outline=0.75)


def tilted(shape: str, rng: np.random.Generator) -> float:
    """The drawing angle: the shape's upright angle plus a tilt of at most ±30°. Free rotation would make
    a tilted square a diamond and hide shape from a tiny model for most of its budget."""
    return UPRIGHT.get(shape, 0.0) + rng.uniform(-MAX_TILT, MAX_TILT)


def render_scene(rng: np.random.Generator, size: int, style: WorldStyle = PRETRAIN_STYLE,
                 shape: str | None = None, colours: tuple[str, ...] = tuple(COLOURS),
                 sizes: tuple[str, ...] = tuple(SIZES), backdrop: str | None = None
                 ) -> tuple[np.ndarray, np.ndarray, Scene]:
    """One image (size, size, 3) uint8, its foreground mask (size, size) bool, and what it shows (the named
    object's colour drawn from ``colours``, its size word from ``sizes``; ``backdrop``: a colour name whose
    shades paint the background's pattern). The defaults draw exactly the pretraining stream."""
    shape = shape or SHAPES[int(rng.integers(len(SHAPES)))]
    colour = colours[int(rng.integers(len(colours)))]
    size_word = sizes[int(rng.integers(len(sizes)))]
    kind = style.backgrounds[int(rng.integers(len(style.backgrounds)))]
    rgb = np.asarray(COLOURS[colour], dtype=np.float32)
    if style.colour_jitter:  # drawn only when asked, so the other styles' streams stay as they were
        rgb = np.clip(rgb + rng.normal(0, style.colour_jitter, 3), 0, 255).astype(np.float32)
    pixels = paint_background(kind, rng, size, luminance(rgb))
    if backdrop:  # the pattern kept as light and dark shades of one named colour (world-textures' class)
        shade = pixels.mean(axis=-1, keepdims=True) / 255.0
        pixels = np.asarray(COLOURS[backdrop], dtype=np.float32) * (0.55 + 0.45 * shade)
    r = rng.uniform(*SIZES[size_word]) * size * style.scale
    cx, cy = rng.uniform(r, size - r), rng.uniform(r, size - r)
    distractors = int(rng.integers(*style.distractors))
    for _ in range(distractors):  # small unnamed shapes, drawn first so the named object covers them
        dr = rng.uniform(0.06, 0.1) * size
        other = list(COLOURS.values())[int(rng.integers(len(COLOURS)))]
        other_shape = SHAPES[int(rng.integers(len(SHAPES)))]
        cover = shape_mask(other_shape, *rng.uniform(dr, size - dr, 2), dr, tilted(other_shape, rng), size)[..., None]
        pixels = pixels * (1 - cover) + np.asarray(other, dtype=np.float32) * cover
    angle = tilted(shape, rng)
    coverage = shape_mask(shape, cx, cy, r, angle, size)
    if style.outline:  # the shape minus a shrunken copy: a filled circle becomes a band, as a ring is
        coverage = np.clip(coverage - shape_mask(shape, cx, cy, r * (1 - style.outline), angle, size), 0, 1)
    fill = np.broadcast_to(rgb * np.asarray(style.colour_cast, dtype=np.float32), (size, size, 3))
    if style.hatched:
        yy, xx = np.mgrid[0:size, 0:size]
        fill = np.where(((xx + yy) // 3 % 2 == 0)[..., None], fill, fill * 0.55)
    fill = fill + rng.normal(0, 6, (size, size, 3))
    pixels = pixels * (1 - coverage[..., None]) + fill * coverage[..., None]
    image = np.clip(pixels, 0, 255).astype(np.uint8)
    scene = Scene(shape, colour, size_word, kind, position_words(cx / size, cy / size), distractors)
    return image, coverage >= 0.5, scene


CAPTION_TEMPLATES = ("a photo of a {}.", "a {}.", "{}", "an image of a {}.", "there is a {}.", "a picture of a {}.")


def caption(scene: Scene, rng: np.random.Generator) -> str:
    """A caption naming a random subset of the scene's attributes (the shape almost always)."""
    words = [scene.size] if rng.random() < 0.4 else []
    if rng.random() < 0.6:  # often left out: colour alone would match most pairs, and shape would never be learned
        words.append(scene.colour)
    words.append(scene.shape if rng.random() < 0.95 else "shape")
    text = " ".join(words)
    if rng.random() < 0.4 and scene.background in PRETRAIN_BACKGROUNDS:
        text += f" on a {PRETRAIN_BACKGROUNDS[scene.background]} background"
    if rng.random() < 0.25:
        text += f" in the {scene.position}"
    if scene.distractors and rng.random() < 0.2:
        text += f" with {scene.distractors} small shape" + ("s" if scene.distractors > 1 else "")
    return CAPTION_TEMPLATES[int(rng.integers(len(CAPTION_TEMPLATES)))].format(text)


def batch_colours(seed: int, group: int, count: int) -> tuple[str, ...]:
    """The ``count`` colours of training batch ``group``: few colours per batch make colour useless for
    telling most pairs apart, so the contrastive loss can only fall by learning shape (and the rest)."""
    rng = np.random.default_rng([seed, group, 1])
    return tuple(np.asarray(list(COLOURS))[rng.choice(len(COLOURS), count, replace=False)])


def world_sample(seed: int, index: int, size: int, style: WorldStyle = PRETRAIN_STYLE,
                 group_size: int | None = None, colours_per_group: int = len(COLOURS)
                 ) -> tuple[np.ndarray, np.ndarray, Scene, str]:
    """Image, mask, scene and caption number ``index`` of the stream ``seed`` (a pure function of both).

    With ``group_size`` (the batch size), the samples of each group of ``group_size`` consecutive
    indices share ``colours_per_group`` colours (`batch_colours`)."""
    rng = np.random.default_rng([seed, index])
    colours = tuple(COLOURS)
    if group_size is not None and colours_per_group < len(COLOURS):
        colours = batch_colours(seed, index // group_size, colours_per_group)
    image, mask, scene = render_scene(rng, size, style, colours=colours)
    return image, mask, scene, caption(scene, rng)


@dataclass(frozen=True)
class WorldShapes:
    """``world-shapes``: the 12 shape kinds as classes, any colour, drawn in the shifted style.

    Shape, not colour, is the class because shape is what the text tower has to learn from how words
    combine (colour is nearly free from pixel statistics), and it splits into 6 base / 6 novel kinds.
    """

    folder: str = "world-shapes"
    split_name: str = "WorldShapes"
    seed: int = 7
    image_size: int = 64
    style: WorldStyle = SHIFTED_STYLE

    @property
    def split_file(self) -> str:
        return f"split_zhou_{self.split_name}.json"

    @property
    def classnames(self) -> tuple[str, ...]:
        return SHAPES

    @property
    def split_sizes(self) -> dict[str, int]:
        return {"train": 20, "val": 8, "test": 50}

    def render(self, class_index: int, index: int) -> tuple[Image.Image, Image.Image]:
        rng = np.random.default_rng([self.seed, class_index, index])
        image, mask, _ = render_scene(rng, self.image_size, self.style, shape=SHAPES[class_index])
        return Image.fromarray(image, "RGB"), Image.fromarray(mask.astype(np.uint8) * 255, "L")


WORLD_SHAPES = WorldShapes()
