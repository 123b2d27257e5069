"""Datasets in the CoOp protocol: registry, splits, few-shot sampling, masks, transforms, datamodule."""

from .catalog import Catalog, Item
from .custom import make_split, resolve_spec
from .datamodule import FewShotDataModule
from .masks import mask_to_patch_grid
from .protocol import ClassSet, ProvidesClassSets
from .registry import DatasetSpec, canonical_names, get_spec
from .transforms import build_transform

__all__ = [
    "Catalog",
    "ClassSet",
    "DatasetSpec",
    "FewShotDataModule",
    "Item",
    "ProvidesClassSets",
    "build_transform",
    "canonical_names",
    "get_spec",
    "make_split",
    "mask_to_patch_grid",
    "resolve_spec",
]
