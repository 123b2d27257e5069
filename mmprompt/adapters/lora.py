"""CLIP-LoRA (Zanella & Ben Ayed, 2024): low-rank updates of the q, k and v projections in every
layer of both towers; the text stays the dataset's hand-written template.

Each update is a weight delta on the seam (`mmprompt.model.encoders.Injection.deltas`): block ``j``'s
projection ``p`` computes ``W_p h + b_p + scale · B A dropout(h)``, which equals the frozen block
with ``W_p + scale · B A`` (dropout is off in evaluation). ``B`` starts at zero, so step 0 is
zero-shot CLIP exactly. No prompt tokens are added: the prompt mass λ of the attention
decomposition is 0 and every route intervention is the identity (docs/analysis.md).

Defaults follow the official code (github.com/MaxZanella/CLIP-LoRA): rank 2, alpha 1, dropout 0.25
on the update's input, A kaiming-uniform(a=√5) and B zeros as in loralib, and ``scale = alpha / √rank``
(its ``LoRALayer``; loralib and PEFT use ``alpha / rank``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..model.attention import PROJECTIONS, Branch, Projection, towers_of
from ..model.encoders import Injection
from ..methods import register_method
from .base import Adapter, BuildContext, select_layers

#: (input, output) widths of each projection in units of the tower's width (the MLP is 4× wide)
WIDTH_FACTORS: dict[str, tuple[int, int]] = {"q": (1, 1), "k": (1, 1), "v": (1, 1), "out": (1, 1), "fc": (1, 4),
                                             "proj": (4, 1)}


class LowRankDelta(nn.Module):
    """``scale · dropout(x) Aᵀ Bᵀ``: what a rank-r update ``scale · B A`` of a frozen (d_out × d_in)
    weight adds to that projection's output, without forming the d_out × d_in matrix."""

    def __init__(self, d_in: int, d_out: int, rank: int, scale: float, dropout: float) -> None:
        super().__init__()
        self.A = nn.Parameter(torch.empty(rank, d_in))
        self.B = nn.Parameter(torch.zeros(d_out, rank))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout)
        self.scale = scale

    def forward(self, x: Tensor) -> Tensor:
        return (self.dropout(x) @ self.A.t().to(x.dtype)) @ self.B.t().to(x.dtype) * self.scale

    def weight(self) -> Tensor:
        """``scale · B A`` (d_out, d_in): the update merged into the frozen weight."""
        return self.scale * self.B @ self.A


@register_method("lora", order=90)
class LoRA(Adapter):
    """CLIP-LoRA.

    Args:
        rank: rank r of every update.
        alpha: the update's scale is ``alpha / sqrt(rank)``, as in the official code.
        dropout: dropout on the update's input while training.
        projections: which linear maps of a block get an update: q, k, v (the paper), out, fc, proj.
        depth: layers 0..depth-1 of each tower get updates; null: every layer (the paper).
        layers: 0-based layer indices instead of ``depth``, the same in both towers.
        branch: which towers get updates: "both", "text" or "vision".
    """

    def __init__(self, rank: int = 2, alpha: float = 1.0, dropout: float = 0.25,
                 projections: list[Projection] | None = None, depth: int | None = None,
                 layers: list[int] | None = None, branch: Branch = "both") -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        towers_of(branch)  # refuses any other value
        self.projections = tuple(projections) if projections is not None else ("q", "k", "v")
        unknown = [name for name in self.projections if name not in PROJECTIONS]
        if unknown or not self.projections:
            raise ValueError(f"projections={list(self.projections)}: expected a non-empty list of "
                             f"{', '.join(PROJECTIONS)}")
        self.rank, self.dropout, self.depth, self.layers, self.branch = rank, dropout, depth, layers, branch
        self.scale = alpha / math.sqrt(rank)

    def build(self, context: BuildContext) -> None:
        spec = context.spec
        towers = {"text": (spec.text_layers, spec.text_width), "vision": (spec.vision_layers, spec.vision_width)}
        self.deltas = nn.ModuleDict()
        for tower, (depth, width) in towers.items():
            if self.branch not in ("both", tower):
                continue
            layers = select_layers(depth if self.depth is None else self.depth, self.layers, depth, tower)
            self.deltas[tower] = nn.ModuleDict({str(layer): self._block_deltas(width) for layer in layers})

    def _block_deltas(self, width: int) -> nn.ModuleDict:
        return nn.ModuleDict({
            name: LowRankDelta(WIDTH_FACTORS[name][0] * width, WIDTH_FACTORS[name][1] * width, self.rank, self.scale,
                               self.dropout)
            for name in self.projections
        })

    def _injection(self, tower: str) -> Injection:
        if tower not in self.deltas:
            return Injection()
        return Injection(deltas={int(layer): dict(block) for layer, block in self.deltas[tower].items()})

    def text_injection(self, image_features: Tensor | None = None) -> Injection:
        return self._injection("text")

    def trains_text(self) -> bool:
        return self.branch in ("both", "text")

    def fold_refusal(self) -> str | None:
        return (f"{type(self).__name__} adds weight deltas (modules on the blocks' linear maps); only learned biases "
                "are folded, so only the adapter form exists (--format adapter)")

    def vision_injection(self) -> Injection:
        return self._injection("vision")
