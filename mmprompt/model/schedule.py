"""MaPLe's learning-rate schedule: constant warm-up epochs, then a per-epoch cosine."""

from __future__ import annotations

import math


def warmup_cosine_factor(epoch: int, base_lr: float, warmup_epochs: int, warmup_lr: float, cosine_epochs: int) -> float:
    """Multiplier of ``base_lr`` for ``epoch`` (Dassl's ConstantWarmupScheduler around CosineAnnealingLR).

    Warm-up epochs run at the constant ``warmup_lr``; epoch ``warmup_epochs + t`` then runs at
    ``base_lr * (1 + cos(pi * t / cosine_epochs)) / 2``. With 5 epochs, 1 warm-up epoch and
    cosine_epochs=5 this gives 1e-5, 0.0035, 0.003166, 0.002291, 0.001209 for base 0.0035.
    """
    if epoch < warmup_epochs:
        return warmup_lr / base_lr
    return 0.5 * (1.0 + math.cos(math.pi * (epoch - warmup_epochs) / cosine_epochs))
