"""The world suite: six few-shot datasets drawn from the captioned world, each standing in for one kind of
dataset in the CoOp suite, so a claim about prompts can be tested on more than one kind of shift.

| key | stands in for | the class is | what makes it hard |
|---|---|---|---|
| ``world_shapes`` | Caltech101 / objects | the shape | outline-only drawing, held-out backgrounds, a colour cast |
| ``world_textures`` | DTD | the background family | two families never named in pretraining (dotted, wavy) |
| ``world_fine`` | Cars / Aircraft / Flowers | colour × shape among near neighbours | red/orange/pink/brown × circle/hexagon/ring, colours jittered |
| ``world_limited`` | EuroSAT | shape × background code | names like "circle annual": the code word names a background the text tower never learned |
| ``world_sketch`` | ImageNet-Sketch | the shape | thin dark outlines on light paper |
| ``world_clutter`` | small objects in scenes | the shape | the object covers a few patches among 3-6 distractors |

Every dataset is a pure function of its seed (one RNG per ``(seed, class, index)``), has the exact mask of
its named object (for ``world_textures`` the object is not the class: the mask still marks it, so
foreground statistics say whether attention goes where the class is *not*), and splits into base /
novel classes by sorted name like every dataset. Zero-shot accuracies are measured in docs/datasets.md.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
from PIL import Image

from .world import COLOURS, PRETRAIN_BACKGROUNDS, SHIFTED_STYLE, WORLD_SHAPES, WorldStyle, render_scene

#: background family -> the word for it in class names (pretraining captions use the first six)
TEXTURE_WORDS = {**PRETRAIN_BACKGROUNDS, "dots": "dotted", "waves": "wavy"}


@dataclass(frozen=True)
class WorldClass:
    """One class: the scene's shape (None: any), colours to draw from (None: all) and background families
    (None: the dataset style's)."""

    name: str
    shape: str | None = None
    colours: tuple[str, ...] | None = None
    backgrounds: tuple[str, ...] | None = None


@dataclass(frozen=True)
class WorldDataset:
    """A generated few-shot dataset of the world suite (the `GeneratedDataset` protocol of ``synthetic``)."""

    folder: str
    split_name: str
    seed: int
    classes: tuple[WorldClass, ...]
    style: WorldStyle
    template: str = "a photo of a {}."
    image_size: int = 64
    sizes: tuple[int, int, int] = (16, 4, 30)  # train, val, test images per class

    @property
    def split_file(self) -> str:
        return f"split_zhou_{self.split_name}.json"

    @property
    def classnames(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.classes)

    @property
    def split_sizes(self) -> dict[str, int]:
        return dict(zip(("train", "val", "test"), self.sizes))

    def render(self, class_index: int, index: int) -> tuple[Image.Image, Image.Image]:
        """Image ``index`` of class ``class_index`` and its mask (0/255): a pure function of both and the seed."""
        image, mask = self.render_arrays(class_index, index)
        return Image.fromarray(image, "RGB"), Image.fromarray(mask.astype(np.uint8) * 255, "L")

    def render_arrays(self, class_index: int, index: int) -> tuple[np.ndarray, np.ndarray]:
        wanted = self.classes[class_index]
        style = replace(self.style, backgrounds=wanted.backgrounds) if wanted.backgrounds else self.style
        rng = np.random.default_rng([self.seed, class_index, index])
        colours = wanted.colours or tuple(COLOURS)
        image, mask, _ = render_scene(rng, self.image_size, style, shape=wanted.shape, colours=colours)
        return image, mask

TEXTURE_STYLE = WorldStyle(tuple(TEXTURE_WORDS), colour_cast=(1.1, 0.95, 0.75), scale=0.5, distractors=(0, 2))
FINE_STYLE = WorldStyle(SHIFTED_STYLE.backgrounds, colour_jitter=18.0)
LIMITED_STYLE = WorldStyle(("stripes", "checks"), colour_cast=(0.9, 1.05, 0.9))
SKETCH_STYLE = WorldStyle(("flat", "noise"), outline=0.35, distractors=(0, 1))
CLUTTER_STYLE = WorldStyle(("clutter", "noise"), scale=0.6, distractors=(2, 6))

SKETCH_SHAPES = WORLD_SHAPES.classnames
LIMITED_SHAPES = ("circle", "cross", "heart", "square", "star", "triangle")
LIMITED_CODES = {"annual": "stripes", "permanent": "checks"}  # code word -> the background it stands for
FINE_COLOURS = ("brown", "orange", "pink", "red")
FINE_SHAPES = ("circle", "hexagon", "ring")

WORLD_TEXTURES = WorldDataset(
    "world-textures", "WorldTextures", 11,
    tuple(WorldClass(word, backgrounds=(family,))
          for family, word in sorted(TEXTURE_WORDS.items(), key=lambda kv: kv[1])), TEXTURE_STYLE,
    template="a photo of a {} background.")
WORLD_FINE = WorldDataset(
    "world-fine", "WorldFine", 12,
    tuple(WorldClass(f"{colour} {shape}", shape, (colour,)) for colour in FINE_COLOURS for shape in FINE_SHAPES),
    FINE_STYLE)
WORLD_LIMITED = WorldDataset(
    "world-limited", "WorldLimited", 13,
    tuple(WorldClass(f"{shape} {code}", shape, backgrounds=(family,))
          for shape in LIMITED_SHAPES for code, family in LIMITED_CODES.items()), LIMITED_STYLE)
WORLD_SKETCH = WorldDataset(
    "world-sketch", "WorldSketch", 14, tuple(WorldClass(s, s, ("black", "gray", "brown")) for s in SKETCH_SHAPES),
    SKETCH_STYLE)
WORLD_CLUTTER = WorldDataset(
    "world-clutter", "WorldClutter", 15, tuple(WorldClass(s, s) for s in SKETCH_SHAPES), CLUTTER_STYLE)

#: the suite in the docs' order; world-shapes (the first downstream set) keeps its own class and sizes
WORLD_SUITE = (WORLD_SHAPES, WORLD_TEXTURES, WORLD_FINE, WORLD_LIMITED, WORLD_SKETCH, WORLD_CLUTTER)
