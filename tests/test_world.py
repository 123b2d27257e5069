"""The captioned world (pretraining stream) and world-shapes (its shifted few-shot dataset)."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest

from mmprompt.data import FewShotDataModule, get_spec
from mmprompt.data.world import (
    COLOURS,
    PRETRAIN_BACKGROUNDS,
    SHAPES,
    SHIFTED_STYLE,
    WORLD_SHAPES,
    render_scene,
    world_sample,
)


def test_stream_is_a_pure_function_of_seed_and_index():
    first = world_sample(3, 17, 64)
    again = world_sample(3, 17, 64)
    other = world_sample(3, 18, 64)
    assert np.array_equal(first[0], again[0]) and np.array_equal(first[1], again[1]) and first[3] == again[3]
    assert not np.array_equal(first[0], other[0])
    image, mask, _, _ = first
    assert image.shape == (64, 64, 3) and image.dtype == np.uint8 and mask.shape == (64, 64) and mask.dtype == bool


def test_world_covers_every_attribute_and_captions_name_them():
    samples = [world_sample(0, index, 64) for index in range(400)]
    scenes = [scene for _, _, scene, _ in samples]
    assert len(SHAPES) >= 12 and len(COLOURS) >= 10 and len(PRETRAIN_BACKGROUNDS) >= 6
    assert {s.shape for s in scenes} == set(SHAPES)
    assert {s.colour for s in scenes} == set(COLOURS)
    assert {s.background for s in scenes} == set(PRETRAIN_BACKGROUNDS)
    assert {s.size for s in scenes} == {"small", "large"}
    assert {s.distractors for s in scenes} == {0, 1, 2, 3}
    named = Counter()
    for _, _, scene, text in samples:
        words = set(text.rstrip(".").split())
        named["shape"] += scene.shape in words
        named["colour"] += scene.colour in words
        named["size"] += scene.size in words
        named["background"] += PRETRAIN_BACKGROUNDS[scene.background] in words
    # the shape is nearly always named; every other attribute is left out often but not always
    assert named["shape"] / 400 > 0.9
    for attribute in ("colour", "size", "background"):
        assert 0.2 < named[attribute] / 400 < 0.8, (attribute, named[attribute])


def test_mask_is_the_named_object_in_its_colour():
    for index in range(20):
        rng = np.random.default_rng(index)
        image, mask, scene = render_scene(rng, 64)
        assert 0.02 < mask.mean() < 0.6
        inside = image[mask].astype(float).mean(axis=0)
        assert np.abs(inside - np.asarray(COLOURS[scene.colour])).max() < 30, (scene, inside)


def test_world_shapes_is_shifted_generated_and_split_base_novel(data_root):
    data = FewShotDataModule(dataset="world-shapes", root=str(data_root), shots=16, subsample="base", image_size=64)
    data.prepare_data()
    spec = get_spec("world-shapes")
    split = json.loads((data_root / "world-shapes" / spec.split_file).read_text())
    assert {name: len(items) for name, items in split.items()} == {"train": 240, "val": 96, "test": 600}
    assert data.class_set("base").classnames == SHAPES[:6] and data.class_set("new").classnames == SHAPES[6:]
    data.setup("test")
    batch = data.datasets["test"][1][0]
    assert batch["has_mask"] and batch["mask"].sum() > 0
    # the shifted style uses only backgrounds held out of pretraining
    assert set(SHIFTED_STYLE.backgrounds).isdisjoint(PRETRAIN_BACKGROUNDS)
    assert WORLD_SHAPES.classnames == SHAPES


@pytest.mark.parametrize("background", [*PRETRAIN_BACKGROUNDS, *SHIFTED_STYLE.backgrounds])
def test_every_background_family_renders(background):
    from mmprompt.data.world import WorldStyle

    image, mask, scene = render_scene(np.random.default_rng(0), 64, WorldStyle((background,)))
    assert scene.background == background and image.std() > 5 and mask.any()


def test_training_batches_draw_their_objects_from_few_colours():
    groups = [{world_sample(0, group * 16 + i, 64, group_size=16, colours_per_group=3)[2].colour for i in range(16)}
              for group in range(6)]
    assert all(len(colours) <= 3 for colours in groups)
    assert len(set().union(*groups)) > 3  # other batches, other colours
    assert world_sample(0, 5, 64, group_size=16, colours_per_group=3)[3] == \
        world_sample(0, 5, 64, group_size=16, colours_per_group=3)[3]


@pytest.mark.parametrize("bad", [(0.0, 1.0), (0.9, 0.5), (0.5, 1.2), (0.5,)])
def test_a_crop_scale_outside_0_to_1_is_refused(tmp_path, bad):
    with pytest.raises(ValueError, match=r"data.crop_scale must be \(low, high\) with 0 < low <= high <= 1"):
        FewShotDataModule(dataset="world-shapes", root=str(tmp_path), crop_scale=bad)


def test_crop_scale_reaches_the_training_crop(data_root):
    data = FewShotDataModule(dataset="world-shapes", root=str(data_root), image_size=64, crop_scale=(0.8, 1.0))
    data.prepare_data()
    data.setup("fit")
    crop = data.datasets["train"][0].transform.transforms[0]
    assert crop.scale == (0.8, 1.0)
