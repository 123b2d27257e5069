"""The adapter interface: trainable tensors that a frozen CLIP takes as per-layer injections.

An adapter is constructed from its hyper-parameters alone (that is what YAML ``init_args`` hold)
and sized later by `build`, once the backbone is known: widths and depths always come from the
model. Removing the adapter gives the original CLIP back; nothing in open_clip is rewritten.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ClassVar

from torch import Tensor, nn

from ..backbone import BackboneSpec
from ..data.protocol import ClassSet
from ..encoders import Injection


@dataclass(frozen=True)
class BuildContext:
    """What `Adapter.build` may read: the backbone's sizes and its frozen word embeddings."""

    spec: BackboneSpec
    embed_words: Callable[[str], Tensor]  # token embeddings (k, text_width) of a phrase, no SOS/EOT


class Adapter(nn.Module):
    """Base class. Subclasses create parameters in `build` and return them as injections."""

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

    def num_trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)


def check_depth(depth: int, available: int, tower: str, option: str = "depth") -> None:
    if not 1 <= depth <= available:
        raise ValueError(f"{option}={depth} is out of range: the {tower} tower has {available} layers (1..{available})")


def select_layers(layers: int | list[int], available: int, tower: str) -> list[int]:
    """``layers`` as a count J (layers 0..J-1) or an explicit list, checked against the tower."""
    if isinstance(layers, int):
        check_depth(layers, available, tower, option="layers")
        return list(range(layers))
    chosen = sorted(set(layers))
    if not chosen or chosen[0] < 0 or chosen[-1] >= available:
        raise ValueError(f"layers={layers} must be a non-empty subset of 0..{available - 1} for the {tower} tower")
    return chosen
