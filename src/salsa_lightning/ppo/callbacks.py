"""Lightning callbacks for PPO, and the sample table every logger gets."""

from __future__ import annotations

import warnings
from typing import Any

from lightning.pytorch.callbacks import Callback

from salsa_lightning.ppo.config import KLHackSpec
from salsa_lightning.rl.monitor import KLHackMonitor


class KLHackCallback(Callback):
    """Paper §A.4's KL-hack: warn or stop when the mean response length collapses (the policy found that an
    empty response has zero KL). The detection itself is `rl.KLHackMonitor`, owned here and saved in checkpoints.

    It is fed what the PPO module logged for the update that just ran (the `training_step` output); a skipped
    update logs nothing, so it is not counted."""

    def __init__(self, spec: KLHackSpec | None = None):
        self.spec = spec or KLHackSpec()
        self.monitor = KLHackMonitor(self.spec.min_fraction, patience=self.spec.patience)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        length = (outputs or {}).get("response_length")
        if length is None or not self.monitor.update(length):
            return
        msg = (
            f"KL-hack: mean response length {length:.1f} fell below {self.spec.min_fraction:.0%} of its starting "
            "value; lower β (kl_coef) or add a missing-EOS penalty."
        )
        pl_module.log("kl_hack/detected", 1.0)
        if self.spec.action == "stop":
            warnings.warn(msg + " Stopping.")
            trainer.should_stop = True
        else:
            warnings.warn(msg)

    def state_dict(self) -> dict[str, Any]:
        return self.monitor.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.monitor.load_state_dict(state_dict)


def log_samples(trainer, columns: list[str], rows: list[list], step: int) -> None:
    """The sample completions of an update: printed as a Rich table, logged as a table to W&B (`WandbLogger`) and as
    Markdown text to TensorBoard; other loggers get the printed table only."""
    from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"PPO samples, step {step}", show_lines=True)
    for c in columns:
        table.add_column(
            c, max_width=60 if c == "response" else 50, justify="right" if c in ("score", "kl") else "left"
        )
    for row in rows:
        table.add_row(*(str(x) for x in row))
    Console().print(table)
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            logger.log_table(key="samples", columns=columns, data=rows, step=step)
        elif isinstance(logger, TensorBoardLogger):
            cell = lambda x: str(x).replace("|", "\\|").replace("\n", " ")  # noqa: E731  (Markdown table cells)
            lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
            lines += ["| " + " | ".join(cell(x) for x in row) + " |" for row in rows]
            logger.experiment.add_text("samples", "\n".join(lines), global_step=step)
