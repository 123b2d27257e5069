"""Deep text prompts only: learnable context at the input and replaced prompts in deeper layers."""

from __future__ import annotations

from ..methods import register_method
from .components import TextPromptAdapter


@register_method("text_deep", order=40)
class TextDeep(TextPromptAdapter):
    """Text-only deep prompting (the language branch of IVLP).

    Args:
        n_ctx: prompt tokens per layer.
        depth: prompted text layers 0..depth-1.
        ctx_init: phrase that initialises the layer-0 context (None: N(0, 0.02)).
    """

    def __init__(self, n_ctx: int = 4, depth: int = 12, ctx_init: str | None = "a photo of a") -> None:
        super().__init__(n_ctx, depth, ctx_init)
