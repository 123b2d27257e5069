"""Deep text prompts only: learnable context at the input and replaced prompts in deeper layers."""

from __future__ import annotations

from ..data.protocol import ClassSet
from ..encoders import Injection
from .base import Adapter, BuildContext
from .components import TextPromptStack


class TextDeep(Adapter):
    """Text-only deep prompting (the language branch of IVLP).

    Args:
        n_ctx: prompt tokens per layer.
        depth: prompted text layers 0..depth-1.
        ctx_init: phrase that initialises the layer-0 context (None: N(0, 0.02)).
    """

    def __init__(self, n_ctx: int = 4, depth: int = 12, ctx_init: str | None = "a photo of a") -> None:
        super().__init__()
        self.text = TextPromptStack(n_ctx, depth, ctx_init)

    def build(self, context: BuildContext) -> None:
        self.text.build(context)

    def prompt_texts(self, classes: ClassSet) -> list[list[str]]:
        return self.text.prompt_texts(classes)

    def text_injection(self, image_features=None) -> Injection:
        return Injection(prompts=self.text.layer_prompts())
