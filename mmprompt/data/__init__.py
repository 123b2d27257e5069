"""Datasets in the CoOp protocol: registry, splits, few-shot sampling, masks, transforms, datamodule.

Names are imported lazily, so ``mmprompt.data.check`` or ``mmprompt.data.fewshot`` don't pay for
importing Lightning.

The bottom layer: the model asks a datamodule for its classes through `mmprompt.classes`, so nothing
here knows the model side.
May import: `classes`, `files`, `tables`.
Never imports: `model`, `adapters`, `analysis`, `run`, `tools`.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Catalog": "catalog",
    "Item": "catalog",
    "DatasetSpec": "registry",
    "canonical_names": "registry",
    "get_spec": "registry",
    "make_split": "custom",
    "resolve_spec": "custom",
    "FewShotDataModule": "datamodule",
    "mask_to_patch_grid": "masks",
    "build_transform": "transforms",
    "check_dataset": "check",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
