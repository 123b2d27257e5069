"""Bias tuning: a learned vector per layer added to every token's update.

The decomposition in docs/analysis.md shows a prompt's value vectors act mostly as such a bias;
this adapter learns the bias directly. Zero init makes step 0 exactly zero-shot CLIP.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from ..model.attention import Branch, towers_of
from ..model.encoders import Injection
from ..methods import register_method
from .base import Adapter, BuildContext, select_layers

Placement = Literal["attn", "mlp", "both"]


def places_of(placement: Placement) -> tuple[str, ...]:
    """Where a bias enters a block: after the attention ("attn"), after the MLP ("mlp"), or both."""
    if placement not in ("attn", "mlp", "both"):
        raise ValueError(f"placement must be 'attn', 'mlp' or 'both', got {placement!r}")
    return ("attn", "mlp") if placement == "both" else (placement,)


def bias_injection(layers: list[int], biases: dict[str, Tensor]) -> Injection:
    """An Injection from {place: (len(layers), width)} tensors."""
    tables = {place: {layer: rows[i] for i, layer in enumerate(layers)} for place, rows in biases.items()}
    return Injection(attn_bias=tables.get("attn", {}), mlp_bias=tables.get("mlp", {}))


@register_method("bias", order=70)
class BiasTuning(Adapter):
    """Independent bias tuning.

    Args:
        depth: biased layers 0..depth-1 in each chosen tower.
        layers: 0-based layer indices instead of ``depth`` (e.g. [0, 5]); null: use ``depth``.
        branch: which towers get biases: "both", "text" or "vision".
        placement: after the attention ("attn"), after the MLP ("mlp"), or "both".
        init_std: 0 (default) starts as zero-shot CLIP; > 0 draws N(0, init_std).
    """

    def __init__(self, depth: int = 9, layers: list[int] | None = None, branch: Branch = "both",
                 placement: Placement = "attn", init_std: float = 0.0) -> None:
        super().__init__()
        towers_of(branch)  # refuses any other value
        self.depth, self.layers, self.branch, self.placement, self.init_std = depth, layers, branch, placement, init_std
        self.places = places_of(placement)

    def build(self, context: BuildContext) -> None:
        spec = context.spec
        towers = {"text": (spec.text_layers, spec.text_width), "vision": (spec.vision_layers, spec.vision_width)}
        self.layer_indices: dict[str, list[int]] = {}
        self.biases = nn.ParameterDict()
        for tower, (depth, width) in towers.items():
            if self.branch not in ("both", tower):
                continue
            self.layer_indices[tower] = select_layers(self.depth, self.layers, depth, tower)
            for place in self.places:
                self.biases[f"{tower}_{place}"] = nn.Parameter(
                    torch.randn(len(self.layer_indices[tower]), width) * self.init_std
                )

    def _injection(self, tower: str) -> Injection:
        if tower not in self.layer_indices:
            return Injection()
        return bias_injection(self.layer_indices[tower], {p: self.biases[f"{tower}_{p}"] for p in self.places})

    def text_injection(self, image_features=None) -> Injection:
        return self._injection("text")

    def trains_text(self) -> bool:
        return self.branch in ("both", "text")

    def fold_refusal(self) -> str | None:
        return None  # learned biases fold exactly into out_proj / c_proj (mmprompt.tools.export)

    def vision_injection(self) -> Injection:
        return self._injection("vision")
