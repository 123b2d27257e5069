"""VPT-deep (Jia et al., 2022): vision prompts at every layer; the text side stays zero-shot."""

from __future__ import annotations

from ..methods import register_method
from ..model.encoders import Injection
from .base import Adapter, BuildContext
from .components import VisionPromptStack, prompt_fold_refusal


@register_method("vpt_deep", order=30)
class VPTDeep(Adapter):
    """VPT-deep.

    Args:
        n_ctx: prompt tokens per layer.
        depth: prompted layers 0..depth-1.
        init: "vpt" (VPT's uniform init) or "normal" (N(0, 0.02)).
    """

    def __init__(self, n_ctx: int = 8, depth: int = 12, init: str = "vpt") -> None:
        super().__init__()
        self.vision = VisionPromptStack(n_ctx, depth, init)

    def build(self, context: BuildContext) -> None:
        self.vision.build(context)

    def vision_injection(self) -> Injection:
        return Injection(prompts=self.vision.layer_prompts())

    def trains_text(self) -> bool:
        return False  # the text side is zero-shot CLIP's: encoded once per run

    def fold_refusal(self) -> str | None:
        return prompt_fold_refusal(self)
