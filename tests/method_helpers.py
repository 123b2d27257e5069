"""The methods a test loops over come from the registry (`mmprompt.methods`), never from a hand-written
list: a new method is checked by every such test the day it is registered."""

from __future__ import annotations

import importlib

from mmprompt.adapters.base import Adapter
from mmprompt.methods import methods


def adapter_class(class_path: str) -> type[Adapter]:
    module, name = class_path.rsplit(".", 1)
    return getattr(importlib.import_module(module), name)


def registered_adapters() -> list[type[Adapter]]:
    """Every registered method's adapter class, in table order."""
    return [adapter_class(info.class_path) for info in methods()]


def adapter_id(adapter_type: type[Adapter]) -> str:
    return adapter_type.__name__
