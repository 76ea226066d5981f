"""RewardModule: Bradley–Terry reward model from an SFT output (paper §3.1 eq. 1, A.2)."""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info
from torchmetrics import MeanMetric

from salsa_lightning.data.collate import length_batches, pad_with_mask
from salsa_lightning.distributed import (
    FSDPSpec,
    forward_through_root,
    full_state_dict,
    shard_decoder_layers,
    uses_fsdp2,
)
from salsa_lightning.models.loading import ModelSpec, base_model_of, canonical_model_ref, is_peft_model, load_tokenizer
from salsa_lightning.modules.common import (
    OptimSpec,
    ResumableStage,
    configure_adamw,
    current_seed,
    format_output_dir,
    save_stage_output,
    scalar_metrics,
)
from salsa_lightning.reward.losses import bradley_terry_loss, pairwise_stats
from salsa_lightning.reward.model import load_reward_model, sequence_scores
from salsa_lightning.rl.masked import masked_moments, mean_var_from_moments
from salsa_lightning.stage import check_output_dir

REWARD_DEFAULT_OPTIM = OptimSpec(lr=2e-5, weight_decay=0.001, warmup_ratio=0.0, schedule="linear")


class RewardModule(ResumableStage):
    """Pairwise reward model; chosen and rejected share one batched forward pass."""

    def __init__(
        self,
        model: ModelSpec | None = None,
        optim: OptimSpec | None = None,
        margin: float = 0.0,
        center_rewards_coefficient: float | None = None,
        output_dir: str | None = None,
        overwrite: bool = False,
        fsdp: FSDPSpec | None = None,
    ):
        """
        Args:
            model: The SFT stage output to start from (a new linear head reads the last token); set `lora` for
                LoRA mode (a reward adapter on the shared frozen base).
            optim: Paper A.2: AdamW, lr 2e-5, weight decay 0.001, linear decay.
            margin: Fixed margin m in -log σ(r_c - r_r - m); a per-row `margin` column, if present, wins.
            center_rewards_coefficient: Weight of the (r_c + r_r)² centering term (TRL's name); None = off.
            output_dir: Where the reward model is written at the end of `fit`; `{seed}` is filled in.
            overwrite: Replace `output_dir` if it exists.
            fsdp: FSDP2 settings, used under `ModelParallelStrategy` (sharded per decoder layer).
        """
        super().__init__()
        self.spec = model or ModelSpec()
        self.optim = optim or REWARD_DEFAULT_OPTIM
        self.margin = margin
        self.center_rewards_coefficient = center_rewards_coefficient
        self.output_dir = format_output_dir(output_dir)
        self.overwrite = overwrite
        self.fsdp = fsdp or FSDPSpec()
        if self.output_dir is not None:
            check_output_dir(self.output_dir, overwrite)
        self.save_hyperparameters()
        self.tokenizer = load_tokenizer(self.spec)
        self.model = None
        self.resolved_config: str | None = None
        self.metrics = torch.nn.ModuleDict(
            {
                f"{split}_{name}": MeanMetric()
                for split in ("train", "val", "test")
                for name in ("loss", "accuracy", "margin", "reward_mean", "reward_std")
            }
        )

    def configure_model(self) -> None:
        if self.model is None:
            self.model = load_reward_model(self.spec, trainable=True, pad_token_id=self.tokenizer.pad_token_id)
            self.model.train()
            if uses_fsdp2(self):
                shard_decoder_layers(self.model, self.device_mesh, self.fsdp)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return sequence_scores(self.model, input_ids, attention_mask)

    def score_batch(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """`forward` under another name: Lightning's forward redirection (FSDP1) cannot target `forward` itself."""
        return self(input_ids, attention_mask)

    def model_step(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        rewards = self(batch["input_ids"], batch["attention_mask"])  # (2B,)
        chosen, rejected = rewards.chunk(2)  # (B,), (B,)
        margin = batch.get("margin", self.margin or None)
        loss = bradley_terry_loss(chosen, rejected, margin, self.center_rewards_coefficient)
        stats = pairwise_stats(chosen.detach(), rejected.detach())
        stats["reward_mean"] = rewards.detach().mean()
        stats["reward_std"] = rewards.detach().std()
        return loss, stats

    def _log(self, split: str, loss: torch.Tensor, stats: dict[str, torch.Tensor], batch_size: int) -> None:
        values = {"loss": loss.detach(), **stats}
        for name, value in values.items():
            metric = self.metrics[f"{split}_{name}"]
            metric.update(value, weight=batch_size)
            self.log(f"{split}/{name}", metric, on_step=split == "train", on_epoch=True, prog_bar=name == "accuracy")

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss, stats = self.model_step(batch)
        self._log("train", loss, stats, batch["input_ids"].shape[0] // 2)
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        loss, stats = self.model_step(batch)
        self._log("val", loss, stats, batch["input_ids"].shape[0] // 2)

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        loss, stats = self.model_step(batch)
        self._log("test", loss, stats, batch["input_ids"].shape[0] // 2)

    def configure_optimizers(self) -> dict[str, Any]:
        return configure_adamw(self, self.optim)

    @torch.no_grad()
    def training_set_reward_stats(self) -> dict[str, float]:
        """Mean/std of the reward over every training sequence (chosen and rejected), with the final weights.

        Scored under the trainer's precision (`bf16-mixed`: the autocast PPO scores under; `on_fit_end` is outside
        Lightning's forward context), in length order: the set is only scored, so no batch needs mixed lengths
        (the quickstart's pairs padded in file order were 1.75x their real tokens, sorted 1.04x). Runs on every
        rank (sharded models need all ranks in each forward), each over the whole set (not the rank's shard).
        """
        was_training = self.model.training
        self.model.eval()
        dm = self.trainer.datamodule
        seqs = [s for key in ("chosen_ids", "rejected_ids") for s in dm.train_set[key]]
        # the rows of one training forward; the same batches on every rank (a sharded forward needs equal shapes)
        batches = length_batches([len(s) for s in seqs], 2 * dm.hparams.batch_size)
        moments = torch.zeros(3, dtype=torch.float64)  # count, sum, sum of squares (rl.masked_moments)
        with self.trainer.precision_plugin.forward_context():
            for rows in batches:
                ids, mask = pad_with_mask([seqs[i] for i in rows], self.tokenizer.pad_token_id)
                ids, mask = ids.to(self.device), mask.to(self.device)
                r = forward_through_root(self, "score_batch", ids, mask).float().cpu()
                moments += masked_moments(r, torch.ones_like(r, dtype=torch.bool))
        self.model.train(was_training)
        mean, var = mean_var_from_moments(moments, unbiased=True)
        return {"mean": float(mean), "std": float(var.sqrt()), "count": int(moments[0])}

    def stage_manifest(self, seed: int | None, global_step: int, metrics: dict[str, float]) -> dict[str, Any]:
        """What the stage output's manifest says about this stage (also written by `export` from a checkpoint);
        `on_fit_end` adds the training-set reward statistics and data counts."""
        return {
            "stage": "reward",
            "format": "lora" if is_peft_model(self.model) else "full",
            "base_model": base_model_of(self.spec.name_or_path),
            "init_from": canonical_model_ref(self.spec.name_or_path),
            "seed": seed,
            "global_step": global_step,
            "metrics": metrics,
            "val_accuracy": float(metrics.get("val/accuracy", float("nan"))),
        }

    def on_fit_end(self) -> None:
        if self.output_dir is None:
            return
        stats = self.training_set_reward_stats()
        state_dict = full_state_dict(self.model, root=self.trainer.model)  # sharded: every rank takes part
        if not self.trainer.is_global_zero:
            return
        datamodule = self.trainer.datamodule
        manifest = self.stage_manifest(
            current_seed(), self.trainer.global_step, scalar_metrics(self.trainer.callback_metrics)
        )
        # the sequence length it was trained on: PPO and evaluation truncate scored conversations the same way
        max_length = getattr(getattr(datamodule, "hparams", None), "max_length", None)
        manifest.update(reward_stats=stats, data_counts=getattr(datamodule, "counts", {}), max_length=max_length)
        path = save_stage_output(
            self.output_dir, self.model, self.tokenizer, manifest, self.resolved_config, self.overwrite,
            state_dict=state_dict,
        )  # fmt: skip
        rank_zero_info(f"Reward model written to {path} (val accuracy {manifest['val_accuracy']:.3f})")
