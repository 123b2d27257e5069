"""IVLP: independent deep prompts in both towers (no coupling between them)."""

from __future__ import annotations

from ..data.protocol import ClassSet
from ..encoders import Injection
from .base import Adapter, BuildContext
from .components import TextPromptStack, VisionPromptStack


class IVLP(Adapter):
    """Independent vision-language prompting.

    Args:
        n_ctx: text prompt tokens per layer.
        n_vision: vision prompt tokens per layer.
        depth: prompted layers 0..depth-1 in both towers.
        ctx_init: phrase that initialises the layer-0 text context.
    """

    def __init__(self, n_ctx: int = 2, n_vision: int = 2, depth: int = 9, ctx_init: str | None = "a photo of a") -> None:
        super().__init__()
        self.text = TextPromptStack(n_ctx, depth, ctx_init)
        self.vision = VisionPromptStack(n_vision, depth, init="normal")

    def build(self, context: BuildContext) -> None:
        self.text.build(context)
        self.vision.build(context)

    def prompt_texts(self, classes: ClassSet) -> list[list[str]]:
        return self.text.prompt_texts(classes)

    def text_injection(self, image_features=None) -> Injection:
        return Injection(prompts=self.text.layer_prompts())

    def vision_injection(self) -> Injection:
        return Injection(prompts=self.vision.layer_prompts())
