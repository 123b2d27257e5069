"""CoOp (Zhou et al., 2022): learnable text context shared by all classes, at the input only."""

from __future__ import annotations

from ..methods import register_method
from .components import TextPromptAdapter


@register_method("coop", order=10)
class CoOp(TextPromptAdapter):
    """CoOp.

    Args:
        n_ctx: number of learnable context tokens.
        ctx_init: phrase whose first ``n_ctx`` word embeddings start the context (e.g.
            "a photo of a" with n_ctx=4); None starts from N(0, 0.02).
    """

    def __init__(self, n_ctx: int = 16, ctx_init: str | None = None) -> None:
        super().__init__(n_ctx, depth=1, ctx_init=ctx_init)
