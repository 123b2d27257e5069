"""CoOp (Zhou et al., 2022): learnable text context shared by all classes, at the input only."""

from __future__ import annotations

from ..data.protocol import ClassSet
from ..encoders import Injection
from .base import Adapter, BuildContext
from .components import TextPromptStack


class CoOp(Adapter):
    """CoOp.

    Args:
        n_ctx: number of learnable context tokens.
        ctx_init: phrase whose first ``n_ctx`` word embeddings start the context (e.g.
            "a photo of a" with n_ctx=4); None starts from N(0, 0.02).
    """

    def __init__(self, n_ctx: int = 16, ctx_init: str | None = None) -> None:
        super().__init__()
        self.text = TextPromptStack(n_ctx, depth=1, ctx_init=ctx_init)

    def build(self, context: BuildContext) -> None:
        self.text.build(context)

    def prompt_texts(self, classes: ClassSet) -> list[list[str]]:
        return self.text.prompt_texts(classes)

    def text_injection(self, image_features=None) -> Injection:
        return Injection(prompts=self.text.layer_prompts())
