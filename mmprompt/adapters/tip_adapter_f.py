"""Tip-Adapter-F (Zhang et al., 2022): Tip-Adapter with its cache keys fine-tuned.

The cache is built as in `mmprompt.adapters.tip_adapter` and its keys ``K`` (K·C × embed_dim, one row
per training image) become the only trainable tensor; the values, α, β and CLIP stay fixed. As in the
official code (github.com/gaopengcuhk/Tip-Adapter, ``main.py``): the keys start as the cache's
normalised keys and are used as they train (not renormalised), the training batches are fresh random
views, AdamW (lr 0.001, eps 1e-4, weight decay 0.01) with a cosine stepped per iteration, and the
optional α/β search runs after training on the validation set (here: when the first test or predict
starts). The official code keeps the epoch of the best *test* accuracy; mmprompt keeps the last epoch.
"""

from __future__ import annotations

from torch import Tensor, nn

from ..methods import register_method
from .tip_adapter import TipAdapter


@register_method("tip_adapter_f", order=130)
class TipAdapterF(TipAdapter):
    """Tip-Adapter-F: the cache keys train (arguments as `TipAdapter`)."""

    def _set_keys(self, keys: Tensor) -> None:
        self.cache_keys = nn.Parameter(keys)

    def searches_at(self, stage: str) -> bool:
        """After training: at the first test or prediction (validation during fit uses the initial α and β)."""
        return stage in ("test", "predict")

    def parameter_formula(self) -> str | None:
        return f"K·C·{self.embed_dim}"
