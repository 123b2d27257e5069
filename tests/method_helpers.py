"""The methods a test loops over come from the registry (`mmprompt.methods`), never from a hand-written
list: a new method is checked by every such test the day it is registered."""

from __future__ import annotations

import importlib
from functools import cache

from mmprompt.adapters.base import Adapter, BuildContext
from mmprompt.methods import methods
from mmprompt.model.backbone import BackboneSpec, get_tokenizer, load_clip
from mmprompt.model.module import word_embedder

TINY = "mmprompt-tiny"


def adapter_class(class_path: str) -> type[Adapter]:
    module, name = class_path.rsplit(".", 1)
    return getattr(importlib.import_module(module), name)


def registered_adapters() -> list[type[Adapter]]:
    """Every registered method's adapter class, in table order."""
    return [adapter_class(info.class_path) for info in methods()]


def adapter_id(adapter_type: type[Adapter]) -> str:
    return adapter_type.__name__


def build_context(clip, tokenizer, spec: BackboneSpec) -> BuildContext:
    """What `Adapter.build` sees for an open_clip model, as `PromptCLIPModule` gives it."""
    return BuildContext(spec, word_embedder(clip, tokenizer))


@cache
def tiny_build_context() -> BuildContext:
    clip = load_clip(TINY, pretrained=None)
    return build_context(clip, get_tokenizer(TINY), BackboneSpec.from_clip(clip, TINY))


@cache
def trains_at_build(adapter_type: type[Adapter]) -> bool:
    """Whether the method's adapter, as registered (default arguments), has tensors to train once built;
    the training-free ones (and Tip-Adapter-F, whose keys come with its cache) have none."""
    adapter = adapter_type()
    adapter.build(tiny_build_context())
    return adapter.num_trainable_parameters() > 0


def trained_adapters() -> list[type[Adapter]]:
    """The registered methods that train from their build."""
    return [adapter for adapter in registered_adapters() if trains_at_build(adapter)]
