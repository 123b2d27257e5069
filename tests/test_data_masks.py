"""Mask readers in image coordinates, masks through the transforms, and the patch grid."""

from __future__ import annotations

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from data_fakes import make_fake
from mmprompt.data import build_transform, get_spec, mask_to_patch_grid
from mmprompt.data.transforms import transform_pair

SIZE = (40, 30)


def read_mask(name, root, path):
    spec = get_spec(name)
    if not spec.dataset_dir(root).exists():
        make_fake(name, root)
    return spec.masks()(spec.dataset_dir(root), path, SIZE)


def test_pets_trimap_values(tmp_path):
    m = read_mask("OxfordPets", tmp_path, "images/Abyssinian_1.jpg")
    assert m.shape == (30, 40)
    assert (m[5:15, 10:20] == 1).all() and (m[4, 10:20] == 0.5).all()
    assert m.sum() == 100 + 0.5 * 10


def test_caltech_contour_is_rasterised_relative_to_its_box(tmp_path):
    m = read_mask("Caltech101", tmp_path, "101_ObjectCategories/accordion/image_0000.jpg")
    # triangle (x, y) = (9, 4), (29, 4), (9, 19) in 0-based pixels
    assert m[4, 9] == m[4, 29] == m[19, 9] == 1
    assert m[19, 29] == 0 and m[0, 0] == 0 and m[25, 35] == 0
    assert 150 <= m.sum() <= 200  # area 150 plus the drawn outline
    # Faces live in Annotations/Faces_2; that contour covers the whole image
    assert read_mask("Caltech101", tmp_path, "101_ObjectCategories/Faces/image_0000.jpg").sum() == 40 * 30


def test_flowers_blue_background_is_not_foreground(tmp_path):
    m = read_mask("OxfordFlowers", tmp_path, "jpg/image_00001.jpg")
    assert (m[11:19, 1:19] == 1).all() and (m[0:8, 25:] == 0).all() and (m[22:, :] == 0).all()


def test_box_sources_use_one_based_inclusive_boxes(tmp_path):
    cars = read_mask("StanfordCars", tmp_path, "cars_train/00001.jpg")  # box (3, 4, 12, 10)
    assert cars.sum() == 10 * 7 and (cars[3:10, 2:12] == 1).all()
    assert read_mask("StanfordCars", tmp_path, "cars_test/00001.jpg").sum() == 40 * 30
    assert read_mask("StanfordCars", tmp_path, "cars_train/00002.jpg") is None
    air = read_mask("FGVCAircraft", tmp_path, "images/1000001.jpg")  # box (11, 6, 30, 25)
    assert air.sum() == 20 * 20 and (air[5:25, 10:30] == 1).all()


def test_imagenet_xml_box_is_rescaled_to_the_stored_image(tmp_path):
    # the XML says 80x60 with box (1,1)-(40,30); the stored image is 40x30 → columns 0..19, rows 0..14
    m = read_mask("ImageNet", tmp_path, "images/val/n01440764/n01440764_0000.JPEG")
    assert m.sum() == 20 * 15 and (m[:15, :20] == 1).all()
    assert read_mask("ImageNet", tmp_path, "images/train/n01440764/n01440764_0000.JPEG") is None


def test_mask_of_wrong_size_is_an_error(tmp_path):
    fake = make_fake("OxfordPets", tmp_path)
    with pytest.raises(ValueError, match=r"trimaps/Abyssinian_1.png is 40x30 but its image is 50x30"):
        get_spec("OxfordPets").masks()(fake.dataset_dir, "images/Abyssinian_1.jpg", (50, 30))


def test_test_transform_equals_open_clip(tmp_path):
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (50, 70, 3), dtype=np.uint8))
    ours = build_transform(train=False, image_size=32)(image)
    theirs = open_clip.image_transform(32, is_train=False)(image)
    assert ours.shape == theirs.shape == (3, 32, 32)
    assert torch.allclose(ours, theirs, atol=1e-5)


def box_image(w: int, h: int, box: tuple[int, int, int, int]) -> tuple[Image.Image, np.ndarray]:
    """A white box on black (image) and the same box as a mask; box = (c1, r1, c2, r2) exclusive."""
    mask = np.zeros((h, w), dtype=np.float32)
    c1, r1, c2, r2 = box
    mask[r1:r2, c1:c2] = 1
    pixels = np.repeat((mask * 255).astype(np.uint8)[..., None], 3, axis=2)
    return Image.fromarray(pixels), mask


def test_mask_follows_resize_and_center_crop():
    # 80x40 image, box columns 40..59, rows 10..29. Resize shorter side 40 → 20 halves everything:
    # 40x20 image, box columns 20..29, rows 5..14; center crop 20 removes 10 columns on the left.
    image, mask = box_image(80, 40, (40, 10, 60, 30))
    _, out = transform_pair(build_transform(False, 20), image, mask)
    expected = torch.zeros(20, 20)
    expected[5:15, 10:20] = 1
    assert torch.equal(out, expected)


def unnormalise(x: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN)[:, None, None]
    std = torch.tensor(open_clip.OPENAI_DATASET_STD)[:, None, None]
    return x * std + mean


def test_train_augmentation_crops_and_flips_mask_with_image():
    # an asymmetric pattern: a flip or a different crop of the mask would disagree with the image
    image, mask = box_image(96, 64, (8, 4, 40, 60))
    transform = build_transform(True, 32)
    torch.manual_seed(0)
    agreements, changed = [], 0
    for _ in range(20):
        pixels, out = transform_pair(transform, image, mask)
        bright = unnormalise(pixels).mean(0)
        sure = (bright > 0.8) | (bright < 0.2)  # skip the bicubic edge
        agreements.append(((bright > 0.5) == (out > 0.5))[sure].float().mean().item())
        changed += int(not torch.equal(out, transform_pair(build_transform(False, 32), image, mask)[1]))
    assert min(agreements) == 1.0
    assert changed >= 18  # the augmentation really moved things


def test_mask_to_patch_grid_row_major_and_threshold():
    mask = torch.zeros(2, 4, 6)
    mask[0, 0:2, 4:6] = 1  # patch (row 0, col 2) fully
    mask[0, 2:4, 0:1] = 1  # patch (row 1, col 0) half covered → foreground at 0.5
    mask[0, 2, 2] = 1  # patch (row 1, col 1) a quarter → background
    mask[1] = 0.5  # a trimap border everywhere: exactly half
    grid = mask_to_patch_grid(mask, patch_size=2)
    assert grid.dtype == torch.bool and grid.shape == (2, 6)
    assert grid[0].tolist() == [False, False, True, True, False, False]
    assert grid[1].all()
    assert mask_to_patch_grid(mask, 2, threshold=0.75)[0].tolist() == [False, False, True, False, False, False]
    with pytest.raises(ValueError, match="not a multiple of patch_size 4"):
        mask_to_patch_grid(mask, 4)
