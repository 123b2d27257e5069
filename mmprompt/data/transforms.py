"""CLIP train/test transforms that move a foreground mask exactly with its image.

Built on torchvision.transforms.v2: the image stays a PIL image through the geometric ops (so the
test transform equals ``open_clip.image_transform(size, is_train=False)``), the mask is a
`ForegroundMask` (a ``tv_tensors.Mask``) that receives the same random crop/flip parameters. Masks
are resized with *nearest-exact* interpolation: mask values stay in their original set ({0, 0.5, 1}
for trimaps), and the sampling grid is pixel-centre aligned like PIL's resampling of the image.
(v2's own mask rule, floor-nearest, shifts the mask up-left by half an output pixel.)
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from open_clip import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

BICUBIC = v2.InterpolationMode.BICUBIC
NEAREST_EXACT = v2.InterpolationMode.NEAREST_EXACT
TRAIN_SCALE = (0.08, 1.0)


class ForegroundMask(tv_tensors.Mask):
    """A (H, W) float foreground mask; crop/flip/pad behave as for ``Mask``, resizing is nearest-exact."""


@TF.register_kernel(TF.resize, ForegroundMask)
def resize_foreground(mask: ForegroundMask, size: list[int], max_size: int | None = None, **_: object) -> ForegroundMask:
    out = TF.resize_mask(mask.as_subclass(torch.Tensor), size, interpolation=NEAREST_EXACT, max_size=max_size)
    return tv_tensors.wrap(out, like=mask)


@TF.register_kernel(TF.resized_crop, ForegroundMask)
def resized_crop_foreground(
    mask: ForegroundMask, top: int, left: int, height: int, width: int, size: list[int], **_: object
) -> ForegroundMask:
    cropped = TF.crop_mask(mask.as_subclass(torch.Tensor), top, left, height, width)
    return tv_tensors.wrap(TF.resize_mask(cropped, size, interpolation=NEAREST_EXACT), like=mask)


def build_transform(
    train: bool,
    image_size: int = 224,
    mean: Sequence[float] = OPENAI_DATASET_MEAN,
    std: Sequence[float] = OPENAI_DATASET_STD,
    crop_scale: tuple[float, float] = TRAIN_SCALE,
) -> v2.Compose:
    """Train: RandomResizedCrop(area ``crop_scale``, CoOp's 0.08–1 by default, bicubic) + horizontal flip;
    test: resize the shorter side (bicubic) + center crop. Both end with CLIP normalisation (images only)."""
    if train:
        geometry = [v2.RandomResizedCrop(image_size, scale=tuple(crop_scale), interpolation=BICUBIC, antialias=True),
                    v2.RandomHorizontalFlip()]
    else:
        geometry = [v2.Resize(image_size, interpolation=BICUBIC, antialias=True), v2.CenterCrop(image_size)]
    return v2.Compose([*geometry, v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))])


def check_crop_scale(crop_scale: Sequence[float]) -> tuple[float, float]:
    """``data.crop_scale`` must be an area range ``(low, high)`` with ``0 < low <= high <= 1``."""
    values = tuple(float(value) for value in crop_scale)
    if len(values) != 2 or not 0 < values[0] <= values[1] <= 1:
        raise ValueError(f"data.crop_scale must be (low, high) with 0 < low <= high <= 1, got {tuple(crop_scale)}")
    return values


def transform_pair(
    transform: v2.Compose, image: Image.Image, mask: np.ndarray | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Apply one transform to an image and its (H, W) float mask with shared random parameters."""
    if mask is None:
        return transform(image).as_subclass(torch.Tensor), None
    out_image, out_mask = transform(image, ForegroundMask(torch.from_numpy(np.ascontiguousarray(mask, dtype=np.float32))))
    return out_image.as_subclass(torch.Tensor), out_mask.as_subclass(torch.Tensor)
