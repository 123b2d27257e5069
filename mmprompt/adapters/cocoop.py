"""CoCoOp (Zhou et al., 2022): CoOp whose context is shifted per image by a small meta-network."""

from __future__ import annotations

from collections import OrderedDict

from torch import Tensor, nn

from ..methods import register_method
from ..model.encoders import Injection
from .base import BuildContext
from .components import TextPromptAdapter


@register_method("cocoop", order=20)
class CoCoOp(TextPromptAdapter):
    """CoCoOp: context_i = context + meta_net(image_feature_i).

    Args:
        n_ctx: number of learnable context tokens.
        ctx_init: phrase that initialises the context (None: N(0, 0.02)).
        bottleneck: the meta-net's hidden width is embed_dim // bottleneck.
    """

    conditions_text_on_image = True

    def __init__(self, n_ctx: int = 4, ctx_init: str | None = "a photo of a", bottleneck: int = 16) -> None:
        super().__init__(n_ctx, depth=1, ctx_init=ctx_init)
        self.bottleneck = bottleneck

    def build(self, context: BuildContext) -> None:
        super().build(context)
        spec = context.spec
        hidden = spec.embed_dim // self.bottleneck
        self.meta_net = nn.Sequential(OrderedDict([
            ("linear1", nn.Linear(spec.embed_dim, hidden)),
            ("relu", nn.ReLU(inplace=True)),
            ("linear2", nn.Linear(hidden, spec.text_width)),
        ]))

    def fold_refusal(self) -> str | None:
        return (f"{type(self).__name__} conditions its text on the image: it can't be folded into CLIP's weights; "
                "export the adapter form instead (--format adapter)")

    def text_injection(self, image_features: Tensor | None = None) -> Injection:
        if image_features is None:
            raise ValueError("CoCoOp's text prompts depend on the image: pass image_features")
        shift = self.meta_net(image_features.to(self.text.context.dtype))  # (B, text_width)
        return Injection(prompts={0: self.text.context.unsqueeze(0) + shift.unsqueeze(1)})
