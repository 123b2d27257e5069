"""Adapters, one file per method; YAML picks one with ``class_path: mmprompt.adapters.<Name>``.

Every module of this package is imported here, and each class registered with
`mmprompt.methods.register_method` is exported under its class name: a new method is one file
(plus its config under ``configs/methods/``) and no edit here.

An adapter sees the frozen CLIP only through the seam (``model/encoders.py``, ``model/attention.py``)
and the backbone's spec; the LightningModule (``model/module.py``) builds it and calls its hooks.
May import: `model.backbone`, `model.encoders`, `model.attention`, `classes`, `methods`.
Never imports: `data`, `analysis`, `run`, `tools`, `model.module`, `model.pretrain`.
"""

from __future__ import annotations

import importlib
import pkgutil

from ..methods import registered
from .base import Adapter, BuildContext

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

#: every registered adapter class of this package, by class name (``MaPLe``, ``CoOp``, ...)
METHOD_CLASSES: dict[str, type[Adapter]] = {
    info.label: getattr(importlib.import_module(info.class_path.rsplit(".", 1)[0]), info.label)
    for info in registered() if info.class_path.startswith(f"{__name__}.")
}
globals().update(METHOD_CLASSES)

__all__ = ["Adapter", "BuildContext", *sorted(METHOD_CLASSES)]
