"""IVLP: independent deep prompts in both towers (no coupling between them)."""

from __future__ import annotations

from ..methods import register_method
from ..model.encoders import Injection
from .base import BuildContext
from .components import TextPromptAdapter, VisionPromptStack


@register_method("ivlp", order=50)
class IVLP(TextPromptAdapter):
    """Independent vision-language prompting.

    Args:
        n_ctx: text prompt tokens per layer.
        n_ctx_vision: vision prompt tokens per layer.
        depth: prompted layers 0..depth-1 in both towers.
        ctx_init: phrase that initialises the layer-0 text context.
    """

    def __init__(self, n_ctx: int = 2, n_ctx_vision: int = 2, depth: int = 9,
                 ctx_init: str | None = "a photo of a") -> None:
        super().__init__(n_ctx, depth, ctx_init)
        self.vision = VisionPromptStack(n_ctx_vision, depth, init="normal", option="n_ctx_vision")

    def build(self, context: BuildContext) -> None:
        super().build(context)
        self.vision.build(context)

    def vision_injection(self) -> Injection:
        return Injection(prompts=self.vision.layer_prompts())
