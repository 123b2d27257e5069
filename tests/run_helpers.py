"""Callbacks that tests load by class_path (the tests folder is on sys.path under pytest)."""

from __future__ import annotations

import lightning as L


class CrashAtEpoch(L.Callback):
    """Simulates a killed job: fails as epoch ``epoch`` starts, after the previous epoch's checkpoint."""

    def __init__(self, epoch: int = 1) -> None:
        self.epoch = epoch

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch == self.epoch:
            raise SystemError(f"simulated crash at the start of epoch {self.epoch}")
