"""SFTModule: supervised fine-tuning on assistant tokens (paper §3.1, A.1)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info
from torchmetrics import MeanMetric

from salsa_lightning.data.chat import IGNORE_INDEX
from salsa_lightning.distributed import FSDPSpec, full_state_dict, is_sharded, shard_decoder_layers, uses_fsdp2
from salsa_lightning.models.loading import (
    ModelSpec,
    canonical_model_ref,
    is_adapter_dir,
    is_peft_model,
    load_causal_lm,
    load_tokenizer,
    resolve_model_path,
)
from salsa_lightning.modules.common import (
    OptimSpec,
    ResumableStage,
    configure_adamw,
    current_seed,
    format_output_dir,
    save_stage_output,
    scalar_metrics,
)
from salsa_lightning.soup.sharded import load_sharded_causal_lm
from salsa_lightning.stage import check_output_dir


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Next-token cross-entropy over labelled tokens: (mean loss, #correct, #tokens).

    logits (B, T, V) predict labels shifted by one; IGNORE_INDEX positions do not count.
    """
    logits = logits[:, :-1].float()  # (B, T-1, V)
    target = labels[:, 1:]  # (B, T-1)
    mask = target != IGNORE_INDEX
    n_tokens = mask.sum()
    loss = F.cross_entropy(logits.flatten(0, 1), target.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
    correct = ((logits.argmax(-1) == target) & mask).sum()
    return loss / n_tokens.clamp(min=1), correct, n_tokens


class SFTModule(ResumableStage):
    """Causal-LM loss on assistant tokens; full fine-tuning or LoRA; writes an HF-format stage output."""

    def __init__(
        self,
        model: ModelSpec | None = None,
        optim: OptimSpec | None = None,
        output_dir: str | None = None,
        overwrite: bool = False,
        fsdp: FSDPSpec | None = None,
    ):
        """
        Args:
            model: The model to fine-tune (and LoRA settings, dtype, attention kernel...).
            optim: AdamW and schedule settings (paper A.1: lr 2.5e-5, warmup ratio 0.03, linear decay).
            output_dir: Where the trained model is written at the end of `fit` (None: not written); `{seed}` is
                replaced by the `--seed_everything` value.
            overwrite: Replace `output_dir` if it exists (otherwise the run refuses to start).
            fsdp: FSDP2 settings (mixed precision, CPU offload), used with `--trainer.strategy ModelParallelStrategy`.
        """
        super().__init__()
        self.spec = model or ModelSpec()
        self.optim = optim or OptimSpec()
        self.output_dir = format_output_dir(output_dir)
        self.overwrite = overwrite
        self.fsdp = fsdp or FSDPSpec()
        if self.output_dir is not None:
            check_output_dir(self.output_dir, overwrite)  # fail before training, not after
        self.save_hyperparameters()
        self.tokenizer = load_tokenizer(self.spec)
        self.model = None
        self.resolved_config: str | None = None  # set by the CLI's config callback
        self.train_loss, self.val_loss, self.test_loss = MeanMetric(), MeanMetric(), MeanMetric()
        self.train_acc, self.val_acc, self.test_acc = MeanMetric(), MeanMetric(), MeanMetric()

    def configure_model(self) -> None:
        # Built here, not in __init__, so sharding strategies can wrap it as it is created.
        if self.model is None:
            if (
                uses_fsdp2(self)
                and self.spec.lora is None
                and not is_adapter_dir(resolve_model_path(self.spec.name_or_path))
            ):
                # full-weight SFT: read straight into shards, so no rank ever holds the whole model
                self.model = load_sharded_causal_lm(self.spec, self.device_mesh, self.fsdp)
            else:
                self.model = load_causal_lm(self.spec, trainable=True)
            self.model.train()  # from_pretrained returns eval mode; dropout (LoRA's too) belongs on in training
            if uses_fsdp2(self) and not is_sharded(self.model):
                shard_decoder_layers(self.model, self.device_mesh, self.fsdp)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits

    def model_step(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits = self(batch["input_ids"], batch["attention_mask"])  # (B, T, V)
        return causal_lm_loss(logits, batch["labels"])

    def _log_step(self, split: str, loss, correct, n_tokens, loss_metric, acc_metric) -> None:
        n = n_tokens.float().clamp(min=1)
        loss_metric.update(loss.detach(), weight=n)
        acc_metric.update(correct.float() / n, weight=n)
        on_step = split == "train"
        self.log(f"{split}/loss", loss_metric, on_step=on_step, on_epoch=True, prog_bar=True)
        self.log(f"{split}/token_acc", acc_metric, on_step=on_step, on_epoch=True)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss, correct, n_tokens = self.model_step(batch)
        self._log_step("train", loss, correct, n_tokens, self.train_loss, self.train_acc)
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        loss, correct, n_tokens = self.model_step(batch)
        self._log_step("val", loss, correct, n_tokens, self.val_loss, self.val_acc)

    def on_validation_epoch_end(self) -> None:
        # token-weighted mean NLL over the whole validation set -> perplexity
        self.log("val/perplexity", torch.exp(self.val_loss.compute()))

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        loss, correct, n_tokens = self.model_step(batch)
        self._log_step("test", loss, correct, n_tokens, self.test_loss, self.test_acc)

    def on_test_epoch_end(self) -> None:
        self.log("test/perplexity", torch.exp(self.test_loss.compute()))

    def configure_optimizers(self) -> dict[str, Any]:
        return configure_adamw(self, self.optim)

    def stage_manifest(self, seed: int | None, global_step: int, metrics: dict[str, float]) -> dict[str, Any]:
        """What the stage output's manifest says about this stage (also written by `export` from a checkpoint)."""
        return {
            "stage": "sft",
            "format": "lora" if is_peft_model(self.model) else "full",
            "base_model": canonical_model_ref(self.spec.name_or_path),
            "seed": seed,
            "global_step": global_step,
            "metrics": metrics,
        }

    def on_fit_end(self) -> None:
        if self.output_dir is None:
            return
        # sharded: every rank takes part in the gather; FSDP1 needs the wrapper Lightning put around this module
        state_dict = full_state_dict(self.model, root=self.trainer.model)
        if not self.trainer.is_global_zero:
            return
        manifest = self.stage_manifest(
            current_seed(), self.trainer.global_step, scalar_metrics(self.trainer.callback_metrics)
        )
        path = save_stage_output(
            self.output_dir, self.model, self.tokenizer, manifest, self.resolved_config, self.overwrite,
            state_dict=state_dict,
        )  # fmt: skip
        rank_zero_info(f"SFT output written to {path}")
