"""Test helpers for the scale-up/down features (QLoRA, FSDP): callbacks the CLI can name by class path."""

from __future__ import annotations

import json
from pathlib import Path

from lightning.pytorch.callbacks import Callback


class LossHistory(Callback):
    """Records the loss of every training step (what a loss-trajectory comparison reads); with `path`, each rank
    also writes its own list to `<path>.rank<N>.json` when training ends (for runs in other processes)."""

    def __init__(self, path: str | None = None):
        self.path = path
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.losses.append(float(loss.detach()))

    def on_train_end(self, trainer, pl_module):
        if self.path is not None:
            Path(f"{self.path}.rank{trainer.global_rank}.json").write_text(json.dumps(self.losses))


def loss_history(cli) -> list[float]:
    return next(cb for cb in cli.trainer.callbacks if isinstance(cb, LossHistory)).losses
