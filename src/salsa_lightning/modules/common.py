"""Pieces every training stage shares: optimiser settings and writing the stage output."""

from __future__ import annotations

import math
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch

from salsa_lightning.seeding import current_seed  # noqa: F401  (stages import it from here)
from salsa_lightning.stage import CONFIG_NAME, atomic_output_dir, write_manifest


@dataclass
class OptimSpec:
    """AdamW with warmup then decay (transformers' schedules)."""

    lr: float = 2.5e-5
    """Peak learning rate."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    eps: float = 1e-8
    """AdamW epsilon."""
    warmup_ratio: float = 0.03
    """Share of the training steps spent warming the learning rate up from 0."""
    schedule: Literal["linear", "cosine", "constant_with_warmup"] = "linear"
    """Decay after warmup (transformers.get_scheduler names)."""

    def __post_init__(self) -> None:
        from salsa_lightning.errors import require

        # lr 0 is refused, not warned about: it trains nothing and would still write an output that looks trained
        require(math.isfinite(self.lr) and self.lr > 0, "model.optim.lr", self.lr, "> 0", 2e-5)
        require(self.weight_decay >= 0, "model.optim.weight_decay", self.weight_decay, ">= 0", 0.0)
        require(
            all(0 <= b < 1 for b in self.betas),
            "model.optim.betas",
            self.betas,
            "two numbers in [0, 1)",
            "[0.9, 0.999]",
        )
        require(self.eps > 0, "model.optim.eps", self.eps, "> 0", 1e-8)
        require(0 <= self.warmup_ratio < 1, "model.optim.warmup_ratio", self.warmup_ratio, "in [0, 1)", 0.03)


def adamw(params: list[torch.nn.Parameter], spec: OptimSpec, precision_plugin=None) -> torch.optim.AdamW:
    """`torch.optim.AdamW` with `spec`'s settings, fused (one kernel per parameter for the whole update) where every
    parameter is a plain CPU or CUDA tensor and the trainer's precision is plain (`32-true`, `bf16-true`, ...). torch
    picks the per-tensor loop on CPU by default (its `foreach` kernels are GPU-only and it never defaults to `fused`),
    which walks each weight-sized tensor about ten times and allocates weight-sized temporaries; the fused kernel
    gives the same update to rounding. Everything else keeps torch's default: sharded (DTensor) parameters, and
    Lightning's mixed-precision and FSDP plugins, which refuse gradient clipping with an optimiser that unscales
    gradients itself (as fused ones do, for fp16's loss scaling)."""
    from lightning.pytorch.plugins.precision import DoublePrecision, HalfPrecision, Precision

    plain = precision_plugin is None or type(precision_plugin) in (Precision, HalfPrecision, DoublePrecision)
    fused = plain and all(
        type(p) in (torch.Tensor, torch.nn.Parameter) and p.is_floating_point() and p.device.type in ("cpu", "cuda")
        for p in params
    )
    return torch.optim.AdamW(
        params, lr=spec.lr, weight_decay=spec.weight_decay, betas=spec.betas, eps=spec.eps, fused=fused or None
    )


def configure_adamw(module, spec: OptimSpec, params=None, total: int | None = None) -> dict[str, Any]:
    """AdamW over `params` (default: the module's trainable parameters), stepped every optimiser step by a
    warmup+decay schedule over `total` steps (default: the trainer's estimate of the run's optimiser steps)."""
    from transformers import get_scheduler

    params = [p for p in module.parameters() if p.requires_grad] if params is None else params
    optimizer = adamw(params, spec, module.trainer.precision_plugin)
    total = max(1, int(module.trainer.estimated_stepping_batches)) if total is None else total
    scheduler = get_scheduler(
        spec.schedule, optimizer, num_warmup_steps=int(spec.warmup_ratio * total), num_training_steps=total
    )
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def library_versions() -> dict[str, str]:
    import lightning
    import peft
    import transformers

    import salsa_lightning

    return {
        "salsa_lightning": salsa_lightning.__version__,
        "torch": torch.__version__,
        "lightning": lightning.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "python": platform.python_version(),
    }


def restore_loader_position(trainer) -> None:
    """Hand the checkpoint's training-loader position (`data.base.ResumableDataLoader`) to the loader.

    Lightning restores a stateful loader only when it builds the loader after the checkpoint's loop state is read;
    `configure_optimizers` sizing its schedule (`estimated_stepping_batches`) builds it earlier, and the position is
    then silently dropped (Lightning issue #20550), so a mid-epoch resume would start its epoch over. Called from
    `on_train_start`: after the restore, before the first batch is drawn; a no-op when there is nothing pending
    (a fresh run, an epoch-end checkpoint, or a Lightning that has loaded it already)."""
    from salsa_lightning.data.base import ResumableDataLoader

    load = getattr(trainer.fit_loop, "_load_combined_loader_states", None)
    if load is not None:
        load()
    if isinstance(trainer.train_dataloader, ResumableDataLoader):
        trainer.train_dataloader.epoch_ends_after(trainer.num_training_batches)


METRIC_STATES_KEY = "salsa_metric_states"


def save_metric_states(module, checkpoint: dict[str, Any]) -> None:
    """Put the running sums of the module's torchmetrics (which its state_dict leaves out) into a checkpoint taken
    mid-epoch, so that a run resumed from it logs the epoch means an uninterrupted run logs. At an epoch's end
    they are about to be reset (and a resumed run starts the next epoch afresh): nothing to save."""
    from lightning.pytorch.trainer.states import TrainerFn
    from torchmetrics import Metric

    trainer = module.trainer
    drawn = trainer.fit_loop.epoch_loop.batch_progress.current.ready  # this epoch's training batches so far
    if trainer.state.fn != TrainerFn.FITTING or drawn >= trainer.num_training_batches:
        return
    checkpoint[METRIC_STATES_KEY] = {
        name: {"state": _detached(m.metric_state), "updates": m.update_count}
        for name, m in module.named_modules()
        if isinstance(m, Metric)
    }


def load_metric_states(module, checkpoint: dict[str, Any]) -> None:
    for name, saved in checkpoint.get(METRIC_STATES_KEY, {}).items():
        metric = module.get_submodule(name)
        for key, value in saved["state"].items():
            device = _device_of(getattr(metric, key))
            setattr(metric, key, [v.to(device) for v in value] if isinstance(value, list) else value.to(device))
        metric._update_count = saved["updates"]  # torchmetrics has no setter; `compute` and Lightning read it
        metric._computed = None


def _detached(state: dict[str, Any]) -> dict[str, Any]:
    return {k: [t.detach().clone() for t in v] if isinstance(v, list) else v.detach().clone() for k, v in state.items()}


def _device_of(value: Any) -> torch.device:
    if isinstance(value, list):
        return value[0].device if value else torch.device("cpu")
    return value.device


def seed_training_step(module, batch_idx: int) -> None:
    """Seed torch's RNG (dropout, LoRA's too) from (seed, epoch, batch, rank) before a training step.

    A checkpoint does not hold the global RNG state, and what draws from it between two steps (a DataLoader's
    `iter`, validation, a resume) differs between a resumed run and an uninterrupted one; a stream that is a
    function of the step alone makes the resumed run's dropout masks the uninterrupted run's. PPO seeds per
    rollout the same way (`PPOModule.training_step`)."""
    import numpy as np

    key = [current_seed() or 0, module.trainer.current_epoch, batch_idx, module.global_rank]
    torch.manual_seed(int(np.random.SeedSequence(key).generate_state(1, np.uint64)[0]))


def format_output_dir(output_dir: str | None) -> str | None:
    """Fill `{seed}` in an output path from `--seed_everything`, so two SFT seeds are two runs of one config."""
    if output_dir is None or "{seed}" not in output_dir:
        return output_dir
    seed = current_seed()
    if seed is None:
        from salsa_lightning.errors import SalsaError

        raise SalsaError(f"The output path {output_dir} uses {{seed}} but no seed is set; pass --seed_everything N.")
    return output_dir.replace("{seed}", str(seed))


def scalar_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    return {
        k: float(v)
        for k, v in sorted(metrics.items())
        if isinstance(v, (int, float, torch.Tensor)) and torch.as_tensor(v).numel() == 1
    }


def save_stage_output(
    output_dir: str | Path,
    model,
    tokenizer,
    manifest: dict[str, Any],
    resolved_config: str | None,
    overwrite: bool,
    extra_files: dict[str, str] | None = None,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write a stage output (HF `save_pretrained` weights or adapter, tokenizer, config, manifest) atomically.

    `model`: a transformers/PEFT model, or a function that writes the weights into the directory it is given
    (PPO's stack, which saves only its policy). `state_dict`: the gathered full weights of a sharded model
    (`distributed.full_state_dict`), which a model is saved from; a writer receives them itself."""
    with atomic_output_dir(output_dir, overwrite=overwrite) as tmp:
        if hasattr(model, "save_pretrained"):
            model.save_pretrained(
                tmp, safe_serialization=True, **({"state_dict": state_dict} if state_dict is not None else {})
            )
        else:
            model(tmp)
        tokenizer.save_pretrained(tmp)
        if resolved_config is not None:
            (tmp / CONFIG_NAME).write_text(resolved_config)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
        from salsa_lightning.distributed import world_size

        # how the weights were trained: a sharded (FSDP1 or FSDP2) model arrives here as its gathered `state_dict`
        training = {"world_size": world_size(), "sharded": state_dict is not None}
        write_manifest(
            tmp,
            {"created": time.strftime("%Y-%m-%dT%H:%M:%S"), "versions": library_versions(), "training": training,
             **manifest},
        )  # fmt: skip
    return Path(output_dir)


class ResumableStage(L.LightningModule):
    """The hooks that make an SFT or reward run resume bit for bit (see `tests/test_resume.py`): running metric
    sums in mid-epoch checkpoints, the train loader's position, and dropout seeded per step."""

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        save_metric_states(self, checkpoint)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        load_metric_states(self, checkpoint)

    def on_train_start(self) -> None:
        restore_loader_position(self.trainer)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        seed_training_step(self, batch_idx)  # resumable dropout
