"""A map-style dataset over catalog items that returns the batch dict of the data contract."""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import Dataset
from torchvision.transforms import v2

from .catalog import Item, open_rgb
from .masks import MaskSource
from .transforms import transform_pair


class ItemDataset(Dataset):
    """Images (and masks, when ``mask_source`` is given) of ``items`` under ``base_dir``.

    Each sample is ``{"image": (3,H,W) float, "label": long, "mask": (H,W) float in [0,1],
    "has_mask": bool, "index": long}``; ``mask``/``has_mask`` are always present (zeros/False when the
    image has no annotation) so the default collate works. ``index`` points into ``items``.
    ``dataset`` names the dataset in errors about its files.
    """

    def __init__(self, base_dir: Path, items: list[Item], transform: v2.Compose, mask_source: MaskSource | None = None,
                 dataset: str = ""):
        self.base_dir, self.items, self.transform, self.mask_source = Path(base_dir), list(items), transform, mask_source
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        item = self.items[index]
        image = open_rgb(self.base_dir / item.path, self.dataset)
        mask = self.mask_source(self.base_dir, item.path, image.size) if self.mask_source else None
        if mask is not None and mask.shape != (image.size[1], image.size[0]):
            raise ValueError(f"mask of {self.base_dir / item.path} has shape {mask.shape}, image is {image.size[::-1]}")
        pixels, out_mask = transform_pair(self.transform, image, mask)
        return {
            "image": pixels,
            "label": torch.tensor(item.label, dtype=torch.long),
            "mask": out_mask if out_mask is not None else torch.zeros(pixels.shape[-2:]),
            "has_mask": torch.tensor(out_mask is not None),
            "index": torch.tensor(index, dtype=torch.long),
        }
