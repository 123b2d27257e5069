"""CLIP-Adapter (Gao et al., 2021): a residual bottleneck MLP on the pooled image features; the text
stays the dataset's hand-written template and is encoded once per run.

The MLP maps the raw (unnormalised) image feature ``f`` of width ``embed_dim`` to
``a = ReLU(W₂ ReLU(W₁ f))`` (``W₁``: embed_dim → embed_dim / reduction, ``W₂`` back, no biases) and
the feature becomes ``ratio · a + (1 − ratio) · f`` before CLIP normalises it. As in the official
code (github.com/gaopengcuhk/CLIP-Adapter, ``clip_adapter.py``): reduction 4, ratio 0.2, a ReLU after
both linear maps (so ``a ≥ 0``), PyTorch's default Linear initialisation, only the MLP trains. The
official file hard-codes the width 1024 (RN50); here it is read from the backbone (512 on ViT-B/16).
No prompt tokens are added: the prompt mass λ of the attention decomposition is 0.
"""

from __future__ import annotations

from torch import Tensor, nn

from ..methods import register_method
from .base import Adapter, BuildContext


@register_method("clip_adapter", order=110)
class CLIPAdapter(Adapter):
    """CLIP-Adapter (visual adapter).

    Args:
        reduction: the bottleneck is ``embed_dim / reduction`` wide.
        ratio: weight of the adapter's output in the residual mix with the frozen feature.
    """

    def __init__(self, reduction: int = 4, ratio: float = 0.2) -> None:
        super().__init__()
        if reduction < 1:
            raise ValueError(f"reduction must be >= 1, got {reduction}")
        if not 0.0 <= ratio <= 1.0:
            raise ValueError(f"ratio must be in [0, 1], got {ratio}")
        self.reduction, self.ratio = reduction, ratio

    def build(self, context: BuildContext) -> None:
        width = context.spec.embed_dim
        if width % self.reduction:
            raise ValueError(f"reduction={self.reduction} does not divide embed_dim={width} of {context.spec.model_name}")
        hidden = width // self.reduction
        self.fc = nn.Sequential(nn.Linear(width, hidden, bias=False), nn.ReLU(inplace=True),
                                nn.Linear(hidden, width, bias=False), nn.ReLU(inplace=True))

    def transform_image_features(self, features: Tensor) -> Tensor:
        """``ratio · MLP(f) + (1 − ratio) · f`` on the raw feature (CLIP normalises the result)."""
        adapted = self.fc(features.to(self.fc[0].weight.dtype))
        return self.ratio * adapted + (1 - self.ratio) * features

    def trains_text(self) -> bool:
        return False

    def fold_refusal(self) -> str | None:
        return (f"{type(self).__name__} adds an MLP on the pooled image features, which no CLIP weight can hold; "
                "only the adapter form exists (--format adapter)")
