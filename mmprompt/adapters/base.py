"""The adapter interface: trainable tensors that a frozen CLIP takes as per-layer injections.

An adapter is constructed from its hyper-parameters alone (that is what YAML ``init_args`` hold)
and sized later by `build`, once the backbone is known: widths and depths always come from the
model. Removing the adapter gives the original CLIP back; nothing in open_clip is rewritten.
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

from torch import Tensor, nn

from ..backbone import BackboneSpec
from ..classes import ClassSet
from ..encoders import Injection


@dataclass(frozen=True)
class BuildContext:
    """What `Adapter.build` may read: the backbone's sizes and its frozen word embeddings."""

    spec: BackboneSpec
    embed_words: Callable[[str], Tensor]  # token embeddings (k, text_width) of a phrase, no SOS/EOT


class RecordsInitArgs(type):
    """Metaclass that keeps the arguments an adapter was constructed with (its YAML ``init_args``).

    That is what makes a checkpoint self-describing: the adapter can be rebuilt from the checkpoint
    alone, whether it was made by the CLI or in Python.
    """

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        adapter = super().__call__(*args, **kwargs)
        bound = inspect.signature(cls.__init__).bind(None, *args, **kwargs)
        bound.apply_defaults()
        adapter.init_args = {name: value for name, value in list(bound.arguments.items())[1:]}
        return adapter


def class_path_of(cls: type) -> str:
    """The shortest importable path of ``cls`` (``mmprompt.adapters.MaPLe`` rather than its module)."""
    package = cls.__module__.rsplit(".", 1)[0]
    if getattr(importlib.import_module(package), cls.__qualname__, None) is cls:
        return f"{package}.{cls.__qualname__}"
    return f"{cls.__module__}.{cls.__qualname__}"


class Adapter(nn.Module, metaclass=RecordsInitArgs):
    """Base class. Subclasses create parameters in `build` and return them as injections."""

    #: the constructor's arguments (set by the metaclass), e.g. {"n_ctx": 2, "depth": 9, ...}
    init_args: dict[str, Any]

    #: True when text features depend on the image (CoCoOp): they can't be cached per evaluation.
    conditions_text_on_image: ClassVar[bool] = False

    def build(self, context: BuildContext) -> None:
        """Create the trainable tensors, sized from ``context.spec``. Called once."""

    def prompt_texts(self, classes: ClassSet) -> list[list[str]]:
        """Text prompts as (templates × classes); the default is the dataset's own template."""
        return [[classes.template.format(name) for name in classes.classnames]]

    def text_injection(self, image_features: Tensor | None = None) -> Injection:
        """Per-layer text injections; ``image_features`` (B, embed_dim), normalised, if conditioned."""
        return Injection()

    def vision_injection(self) -> Injection:
        """Per-layer vision injections."""
        return Injection()

    def config(self) -> dict[str, Any]:
        """``{class_path, init_args}``: the YAML that rebuilds this adapter (before `build`)."""
        return {"class_path": class_path_of(type(self)), "init_args": dict(self.init_args)}

    def num_trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)


def check_depth(depth: int, available: int, tower: str, option: str = "depth") -> None:
    if not 1 <= depth <= available:
        raise ValueError(f"{option}={depth} is out of range: the {tower} tower has {available} layers (1..{available})")


def check_layers_option(layers: list[int] | None) -> None:
    """``layers`` holds 0-based layer indices; a bare count is refused, since it once meant layers 0..N-1."""
    if isinstance(layers, int) and not isinstance(layers, bool):
        raise ValueError(f"layers={layers} is a count, but layers takes 0-based layer indices (e.g. [0, 2, 5]); "
                         f"for layers 0..{layers - 1} use depth: {layers}")


def select_layers(depth: int, layers: list[int] | None, available: int, tower: str) -> list[int]:
    """``layers`` (0-based indices) when given, else the first ``depth`` layers 0..depth-1, checked against the tower."""
    if layers is None:
        check_depth(depth, available, tower)
        return list(range(depth))
    chosen = sorted(set(layers))
    if not chosen or chosen[0] < 0 or chosen[-1] >= available:
        raise ValueError(f"layers={layers} must be a non-empty subset of 0..{available - 1} for the {tower} tower")
    return chosen
