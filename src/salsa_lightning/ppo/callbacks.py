"""Lightning callbacks for PPO."""

from __future__ import annotations

import warnings

from lightning.pytorch.callbacks import Callback


class KLHackCallback(Callback):
    """Paper §A.4's KL-hack: warn or stop when the mean response length collapses (the policy found that an
    empty response has zero KL). The detection itself is `rl.KLHackMonitor`."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        metrics = getattr(pl_module, "last_metrics", None)
        if not metrics or "response_length" not in metrics:
            return
        if pl_module.monitor.update(metrics["response_length"]):
            msg = (
                f"KL-hack: mean response length {metrics['response_length']:.1f} fell below "
                f"{pl_module.kl_hack.min_fraction:.0%} of its starting value; lower β (kl_coef) or add a missing-EOS penalty."
            )
            pl_module.log("kl_hack/detected", 1.0)
            if pl_module.kl_hack.action == "stop":
                warnings.warn(msg + " Stopping.")
                trainer.should_stop = True
            else:
                warnings.warn(msg)
