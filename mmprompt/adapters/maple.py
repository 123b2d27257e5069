"""MaPLe (Khattak et al., 2023): deep text prompts, each layer's vision prompt projected from it."""

from __future__ import annotations

from ..methods import register_method
from ..model.encoders import Injection
from .base import BuildContext, check_depth
from .components import TextPromptAdapter, text_to_vision_projections


@register_method("maple", order=60)
class MaPLe(TextPromptAdapter):
    """Multi-modal prompt learning.

    Text prompts at layers 0..depth-1 (layer 0 from ``ctx_init``, deeper ones N(0, 0.02)); the
    vision prompt of layer j is ``Linear_j(text prompt j)``, with PyTorch's default Linear init.

    Args:
        n_ctx: prompt tokens per layer in both towers.
        depth: prompted layers J.
        ctx_init: phrase that initialises the layer-0 text context.
    """

    def __init__(self, n_ctx: int = 2, depth: int = 9, ctx_init: str | None = "a photo of a") -> None:
        super().__init__(n_ctx, depth, ctx_init)

    def build(self, context: BuildContext) -> None:
        check_depth(self.text.depth, context.spec.vision_layers, "vision")
        super().build(context)
        self.projections = text_to_vision_projections(self.text.depth, context)

    def vision_injection(self) -> Injection:
        text_prompts = self.text.layer_prompts()
        return Injection(prompts={j: self.projections[j](text_prompts[j]) for j in text_prompts})
