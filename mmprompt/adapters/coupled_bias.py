"""Coupled bias tuning: MaPLe's coupling and parameter budget, with biases instead of prompts.

A text bias per layer; the vision bias of layer j is ``Linear_j(text bias j)``. Text biases and the
Linear biases start at zero, so step 0 is zero-shot CLIP.
"""

from __future__ import annotations

import torch
from torch import nn

from ..methods import register_method
from ..model.encoders import Injection
from .base import Adapter, BuildContext, select_layers
from .bias import Placement, bias_injection, places_of
from .components import text_to_vision_projections


@register_method("coupled_bias", order=80)
class CoupledBiasTuning(Adapter):
    """Coupled bias tuning.

    Args:
        depth: biased layers 0..depth-1, the same in both towers.
        layers: 0-based layer indices instead of ``depth`` (e.g. [0, 5]); null: use ``depth``.
        placement: after the attention ("attn"), after the MLP ("mlp"), or "both".
    """

    def __init__(self, depth: int = 9, layers: list[int] | None = None, placement: Placement = "attn") -> None:
        super().__init__()
        self.depth, self.layers, self.placement = depth, layers, placement
        self.places = places_of(placement)

    def build(self, context: BuildContext) -> None:
        spec = context.spec
        self.layer_indices = select_layers(self.depth, self.layers, min(spec.text_layers, spec.vision_layers),
                                           "text and vision")
        count = len(self.layer_indices)
        self.text_biases = nn.ParameterDict({p: nn.Parameter(torch.zeros(count, spec.text_width)) for p in self.places})
        self.projections = nn.ModuleDict(
            {p: text_to_vision_projections(count, context, zero_bias=True) for p in self.places}
        )

    def text_injection(self, image_features=None) -> Injection:
        return bias_injection(self.layer_indices, dict(self.text_biases))

    def fold_refusal(self) -> str | None:
        return None  # both towers' biases fold exactly into out_proj / c_proj (mmprompt.tools.export)

    def vision_injection(self) -> Injection:
        vision = {
            place: torch.stack([self.projections[place][i](rows[i]) for i in range(len(self.layer_indices))])
            for place, rows in self.text_biases.items()
        }
        return bias_injection(self.layer_indices, vision)
