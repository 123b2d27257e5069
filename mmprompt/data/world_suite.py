"""The world suite: six few-shot datasets drawn from the captioned world, each standing in for one kind of
dataset in the CoOp suite, so a claim about prompts can be tested on more than one kind of shift.

| key | stands in for | the class is | what makes it hard |
|---|---|---|---|
| ``world_shapes`` | Caltech101 / objects | the shape | outline-only drawing, held-out backgrounds, a colour cast |
| ``world_textures`` | DTD | the background's colour | the background's pattern varies; a full-size object of another colour sits on it, and pretraining captions name the *object's* colour |
| ``world_fine`` | Cars / Aircraft / Flowers | colour × shape among near neighbours | red/orange/pink/brown × circle/hexagon/ring, colours jittered, outline-only drawing with a colour cast |
| ``world_limited`` | EuroSAT | shape × colour group | names say one colour of four ("red circle" is a red, orange, yellow or brown circle) |
| ``world_sketch`` | ImageNet-Sketch | the shape | thin dark outlines on light paper |
| ``world_clutter`` | small objects in scenes | the shape | a small outline object (a few 8-px patches) among 2-5 distractors |

Every dataset is a pure function of its seed (one RNG per ``(seed, class, index)``), has the exact mask of
its named object (for ``world_textures`` the object is not the class: the mask still marks it, so
foreground statistics say whether attention goes where the class is *not*), and splits into base /
novel classes by sorted name like every dataset. Zero-shot accuracies, and what few-shot learning fixes
on each, are measured in docs/datasets.md.

Why not unknown code words (the first rendering of ``world_limited``: "circle annual" for a striped
background): a word absent from pretraining captions had its token embedding decayed to ~0, so "circle
annual" and "circle permanent" encode to the same text feature (cosine 1.000), and no method whose
parameters are shared by all classes can ever tell them apart. Background-family words fare the same
("striped" vs "checkered": 1.000); colour and shape words are what this text tower knows.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
from PIL import Image

from .world import (
    COLOURS, PRETRAIN_BACKGROUNDS, SHIFTED_BACKGROUNDS, SHIFTED_STYLE, SIZES, WORLD_SHAPES, WorldStyle, render_scene,
)


@dataclass(frozen=True)
class WorldClass:
    """One class: the scene's shape (None: any), colours to draw from (None: all), background families (None:
    the dataset style's), size words (None: both) and the colour the background is painted in (None: grey)."""

    name: str
    shape: str | None = None
    colours: tuple[str, ...] | None = None
    backgrounds: tuple[str, ...] | None = None
    sizes: tuple[str, ...] | None = None
    backdrop: str | None = None


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
        image, mask, _ = render_scene(rng, self.image_size, style, shape=wanted.shape, colours=colours,
                                      sizes=wanted.sizes or tuple(SIZES),
                                      backdrop=wanted.backdrop)
        return image, mask

TEXTURE_STYLE = WorldStyle((*PRETRAIN_BACKGROUNDS, *SHIFTED_BACKGROUNDS), colour_cast=(1.1, 0.95, 0.75), distractors=(0, 2))
FINE_STYLE = replace(SHIFTED_STYLE, colour_jitter=18.0)
LIMITED_STYLE = WorldStyle(("stripes", "checks"), colour_cast=(0.9, 1.05, 0.9))
SKETCH_STYLE = WorldStyle(("flat", "noise"), outline=0.35, distractors=(0, 1))
CLUTTER_STYLE = WorldStyle(("clutter", "noise"), outline=0.75, distractors=(2, 6))

SKETCH_SHAPES = WORLD_SHAPES.classnames
LIMITED_SHAPES = ("circle", "cross", "heart", "square", "star", "triangle")
#: the colour word of a class name ("circle in red") -> the colours its images take: the name says one of four
LIMITED_GROUPS = {"red": ("red", "orange", "yellow", "brown"), "blue": ("blue", "cyan", "green", "purple")}
TEXTURE_COLOURS = ("blue", "brown", "cyan", "green", "orange", "pink", "purple", "red")
FINE_COLOURS = ("brown", "orange", "pink", "red")
FINE_SHAPES = ("circle", "hexagon", "ring")

WORLD_TEXTURES = WorldDataset(
    "world-textures", "WorldTextures", 11,
    tuple(WorldClass(colour, colours=tuple(c for c in COLOURS if c != colour), backdrop=colour)
          for colour in TEXTURE_COLOURS), TEXTURE_STYLE,
    template="a photo of a {} background.")
WORLD_FINE = WorldDataset(
    "world-fine", "WorldFine", 12,
    tuple(WorldClass(f"{colour} {shape}", shape, (colour,)) for colour in FINE_COLOURS for shape in FINE_SHAPES),
    FINE_STYLE)
WORLD_LIMITED = WorldDataset(
    "world-limited", "WorldLimited", 13,
    tuple(WorldClass(f"{shape} in {word}", shape, colours)
          for shape in LIMITED_SHAPES for word, colours in sorted(LIMITED_GROUPS.items())), LIMITED_STYLE)
WORLD_SKETCH = WorldDataset(
    "world-sketch", "WorldSketch", 14, tuple(WorldClass(s, s, ("black", "gray", "brown")) for s in SKETCH_SHAPES),
    SKETCH_STYLE)
WORLD_CLUTTER = WorldDataset(
    "world-clutter", "WorldClutter", 15, tuple(WorldClass(s, s, sizes=("small",)) for s in SKETCH_SHAPES), CLUTTER_STYLE)

#: the suite in the docs' order; world-shapes (the first downstream set) keeps its own class and sizes
WORLD_SUITE = (WORLD_SHAPES, WORLD_TEXTURES, WORLD_FINE, WORLD_LIMITED, WORLD_SKETCH, WORLD_CLUTTER)
