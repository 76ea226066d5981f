"""Test helpers for the scale-up/down features (QLoRA, FSDP): callbacks the CLI can name by class path."""

from __future__ import annotations

from lightning.pytorch.callbacks import Callback


class LossHistory(Callback):
    """Records the loss of every training step (what a loss-trajectory comparison reads)."""

    def __init__(self):
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.losses.append(float(loss.detach()))


def loss_history(cli) -> list[float]:
    return next(cb for cb in cli.trainer.callbacks if isinstance(cb, LossHistory)).losses
