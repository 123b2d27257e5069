"""The world suite (mmprompt/data/world_suite.py): six generated downstream datasets, registered like every
dataset, deterministic from their seed, with exact masks and sorted base/novel splits."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from mmprompt.data import get_spec
from mmprompt.data.synthetic import RENDERING_FILE, generate_synthetic
from mmprompt.data.world import COLOURS, SIZES, WORLD_SHAPES, luminance, shape_mask
from mmprompt.data.world_suite import (
    LIMITED_GROUPS, TEXTURE_COLOURS, WORLD_CLUTTER, WORLD_FINE, WORLD_LIMITED, WORLD_SKETCH, WORLD_SUITE,
    WORLD_TEXTURES, WorldDataset,
)

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "datasets"
NEW = [d for d in WORLD_SUITE if d is not WORLD_SHAPES]


def key_of(dataset) -> str:
    return dataset.folder.replace("-", "_")


def test_the_suite_has_six_datasets_each_registered_with_a_config():
    assert len(WORLD_SUITE) == 6 and len({d.folder for d in WORLD_SUITE}) == 6
    for dataset in WORLD_SUITE:
        spec = get_spec(key_of(dataset))
        assert spec.folder == dataset.folder and spec.split_file == dataset.split_file
        config = yaml.safe_load((CONFIGS / f"{spec.key}.yaml").read_text())
        assert get_spec(config["data"]["dataset"]) is spec
    assert get_spec("world_textures").template == "a photo of a {} background."


@pytest.mark.parametrize("dataset", NEW, ids=key_of)
def test_rendering_is_a_pure_function_of_seed_class_and_index(dataset: WorldDataset):
    image, mask = dataset.render_arrays(1, 3)
    again, mask_again = dataset.render_arrays(1, 3)
    assert image.tobytes() == again.tobytes() and mask.tobytes() == mask_again.tobytes()
    assert image.shape == (64, 64, 3) and mask.dtype == bool and mask.any()
    other, _ = replace(dataset, seed=dataset.seed + 100).render_arrays(1, 3)
    assert other.tobytes() != image.tobytes()
    assert dataset.render_arrays(1, 4)[0].tobytes() != image.tobytes()


@pytest.mark.parametrize("dataset", NEW, ids=key_of)
def test_generated_tree_has_exact_sizes_masks_and_a_sorted_base_novel_split(dataset: WorldDataset, data_root):
    folder = generate_synthetic(data_root, dataset)  # written once per session; the config tests read it too
    split = json.loads((folder / dataset.split_file).read_text())
    n = len(dataset.classnames)
    assert {name: len(items) for name, items in split.items()} == {k: v * n for k, v in dataset.split_sizes.items()}
    assert list(dataset.classnames) == sorted(dataset.classnames)  # label order = sorted names
    base = {label for label in range(math.ceil(n / 2))}
    assert {item[2] for item in split["train"] if item[1] in base} == set(dataset.classnames[: math.ceil(n / 2)])
    rel, label, _ = split["test"][5]
    index = int(Path(rel).stem.rsplit("_", 1)[1])
    image, mask = dataset.render_arrays(label, index)
    assert np.array_equal(np.asarray(Image.open(folder / "images" / rel)), image)
    assert np.array_equal(np.asarray(Image.open(folder / "masks" / rel)) > 0, mask)


def test_a_regenerated_tree_is_byte_identical(tmp_path):
    small = replace(WORLD_LIMITED, sizes=(2, 1, 2))  # same renderer and seed, fewer images
    first = generate_synthetic(tmp_path / "a", small)
    second = generate_synthetic(tmp_path / "b", small)
    assert len(list(first.rglob("*.png"))) == 2 * 12 * 5
    for path in sorted(first.rglob("*")):
        if path.is_file():
            assert path.read_bytes() == (second / path.relative_to(first)).read_bytes()


def test_the_mask_is_the_named_object_at_its_drawn_coverage():
    """Drawn alone on a flat background, the mask is exactly the shape's coverage ≥ 0.5."""
    flat = replace(WORLD_FINE, style=replace(WORLD_FINE.style, backgrounds=("flat",), distractors=(0, 1)))
    image, mask = flat.render_arrays(0, 0)  # a brown circle
    inside = image[mask].astype(float).mean(axis=0)
    assert abs(luminance(inside) - luminance(np.array([125, 75, 30]))) < 30
    assert 0 < mask.mean() < 0.6
    circle = shape_mask("circle", 32, 32, 10, 0.0, 64) >= 0.5
    assert circle.sum() == pytest.approx(math.pi * 10.5**2, rel=0.05)  # PIL boxes are inclusive: r + 0.5


def background_colour(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The background's colour: the median of the pixels outside the named object."""
    return np.median(image[~mask].astype(float), axis=0)


def test_each_dataset_has_the_property_it_stands_for():
    # textures: the class is the background's colour; the object on it never has that colour
    assert WORLD_TEXTURES.classnames == TEXTURE_COLOURS
    for label, name in enumerate(TEXTURE_COLOURS):
        image, mask = WORLD_TEXTURES.render_arrays(label, 0)
        assert name not in WORLD_TEXTURES.classes[label].colours
        assert np.corrcoef(background_colour(image, mask), COLOURS[name])[0, 1] > 0.8, name
    # limited category information: two classes per shape whose names say one colour of the four they cover
    groups = [set(colours) for colours in LIMITED_GROUPS.values()]
    assert len(groups) == 2 and not groups[0] & groups[1]
    for cls in WORLD_LIMITED.classes:
        word = cls.name.split(" in ")[1]
        assert word in cls.colours and len(cls.colours) == 4 and set(cls.colours) == set(LIMITED_GROUPS[word])
    assert {c.shape for c in WORLD_LIMITED.classes[:6]} == {"circle", "cross", "heart"}  # base: both groups
    # fine-grained: every class has a near neighbour in colour and in shape
    assert len(WORLD_FINE.classnames) == 12 and WORLD_FINE.style.colour_jitter > 0
    # small objects in clutter: the object is about 7 of the 64 8-px patches, with distractors around it
    coverage = np.mean([WORLD_CLUTTER.render_arrays(c, i)[1].mean() for c in range(12) for i in range(3)])
    shapes = np.mean([WORLD_SHAPES.render(c, i)[1].getextrema()[1] > 0 for c in range(12) for i in range(3)])
    assert coverage < 0.12 and shapes == 1.0 and WORLD_CLUTTER.style.distractors[0] >= 2
    assert {c.sizes for c in WORLD_CLUTTER.classes} == {("small",)} and "small" in SIZES
    # drawing style: dark thin outlines on light paper
    image, mask = WORLD_SKETCH.render_arrays(0, 0)
    assert luminance(image[mask].mean(axis=0)) < luminance(image[~mask].mean(axis=0))


def test_a_tree_written_by_another_definition_is_refused_naming_its_folder(tmp_path):
    """A dataset's definition can change between versions (world-limited and world-textures did); reading an
    old tree under the same folder name would test on images the definition no longer draws."""
    small = replace(WORLD_LIMITED, sizes=(1, 1, 1))
    folder = generate_synthetic(tmp_path, small)
    assert generate_synthetic(tmp_path, small) == folder  # the same definition reuses the tree
    changed = replace(small, classes=small.classes[::-1])
    with pytest.raises(ValueError, match=r"world-limited.*another definition.*remove the folder"):
        generate_synthetic(tmp_path, changed)
    (folder / RENDERING_FILE).unlink()  # a tree written before stamps existed
    with pytest.raises(ValueError, match="written before trees were stamped"):
        generate_synthetic(tmp_path, small)
