"""FSDP1 (`FullyShardedDataParallel`) that wraps each decoder layer, configurable from YAML.

Why a subclass and not `strategy: fsdp` with `auto_wrap_policy: ...` in the config: Lightning's `FSDPStrategy`
takes the wrap and activation-checkpointing policies as classes or callables, which LightningCLI's parser drops
without a word (they vanish from `--print_config`), and the right classes depend on the model a stage loads
(`LlamaDecoderLayer`, `MistralDecoderLayer`, ...), which exists only once `configure_model` has run. So this
strategy finds them itself, in `setup` (after `configure_model`, before the model is wrapped), from every
transformers model inside the LightningModule (`distributed.decoder_layers`, through any PEFT wrapper). Without a
wrap policy FSDP1 makes the whole model one unit and gathers all of it for every forward: no memory saved.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.pytorch.plugins.precision import FSDPPrecision
from lightning.pytorch.strategies import FSDPStrategy

from salsa_lightning.distributed import decoder_layers
from salsa_lightning.errors import SalsaError


def transformers_models(module: torch.nn.Module) -> list[torch.nn.Module]:
    """Every transformers model inside `module` (a LightningModule holds one or more: policy, critic, frozen
    anchors); a PEFT wrapper sits above its transformers model, so it is covered through it."""
    from transformers import PreTrainedModel

    models = [m for m in module.modules() if isinstance(m, PreTrainedModel)]
    if not models:
        raise SalsaError(
            f"{type(module).__name__} holds no transformers model, so DecoderLayerFSDPStrategy has no decoder layers "
            "to wrap; build the model in `configure_model`, or use `strategy: fsdp` with your own wrap policy."
        )
    return models


def decoder_layer_classes(module: torch.nn.Module) -> set[type[torch.nn.Module]]:
    """The decoder-layer classes of every transformers model inside `module`."""
    return {type(layer) for model in transformers_models(module) for layer in decoder_layers(model)}


class RootClippingFSDPPrecision(FSDPPrecision):
    """Lightning's `FSDPPrecision`, plus gradient clipping by norm (`trainer.gradient_clip_val`, which the paper
    recipes set), which Lightning's refuses because it holds no reference to the FSDP root. Per-parameter
    `torch.nn.utils.clip_grad_norm_` would see only this rank's shards; the root's `clip_grad_norm_` reduces the
    norm over all of them."""

    def __init__(self, precision: Any, scaler: Any = None, strategy: FSDPStrategy | None = None) -> None:
        super().__init__(precision, scaler)
        self.strategy = strategy

    def clip_grad_by_norm(self, optimizer: Any, clip_val: float) -> None:
        self.strategy.model.clip_grad_norm_(clip_val)


class DecoderLayerFSDPStrategy(FSDPStrategy):
    """Lightning's FSDP1 strategy with one FSDP unit per decoder layer (and, optionally, activation checkpointing
    of the same layers). Mixed precision comes from `trainer.precision` (`bf16-true`, `bf16-mixed`, ...)."""

    def __init__(
        self,
        accelerator: pl.accelerators.Accelerator | None = None,
        parallel_devices: list[torch.device] | None = None,
        cluster_environment: Any = None,
        checkpoint_io: Any = None,
        precision_plugin: Any = None,
        process_group_backend: str | None = None,
        timeout: timedelta | None = default_pg_timeout,
        cpu_offload: bool = False,
        activation_checkpointing: bool = False,
        sharding_strategy: Literal["FULL_SHARD", "SHARD_GRAD_OP", "NO_SHARD", "HYBRID_SHARD"] = "FULL_SHARD",
        state_dict_type: Literal["full", "sharded"] = "full",
        device_mesh: tuple[int, int] | None = None,
        limit_all_gathers: bool = True,
        forward_prefetch: bool = False,
        **kwargs: Any,
    ) -> None:
        """
        Args:
            cpu_offload: Keep sharded weights and gradients in CPU memory (slower; for models that do not fit).
            activation_checkpointing: Recompute each decoder layer's activations in backward (FSDP's checkpoint
                wrapper) instead of storing them; turn the model's own `gradient_checkpointing` off then.
            sharding_strategy: FULL_SHARD (ZeRO-3), SHARD_GRAD_OP (ZeRO-2), NO_SHARD (DDP), HYBRID_SHARD (shard
                within a node, replicate across nodes; with `device_mesh`).
            state_dict_type: Lightning checkpoints as one file gathered on rank 0 ("full") or one shard per rank
                in a folder ("sharded": faster, less memory; the stage output is full weights either way).
            device_mesh: (replicas, shard size) for HYBRID_SHARD, e.g. (2, 8) for two nodes of 8 GPUs.
            limit_all_gathers: Throttle all-gathers ahead of compute (FSDP's default; bounds peak memory).
            forward_prefetch: Issue the next layer's all-gather before the current forward (faster, more memory).
        """
        self.activation_checkpointing = activation_checkpointing
        super().__init__(
            accelerator=accelerator,
            parallel_devices=parallel_devices,
            cluster_environment=cluster_environment,
            checkpoint_io=checkpoint_io,
            precision_plugin=precision_plugin,
            process_group_backend=process_group_backend,
            timeout=timeout,
            cpu_offload=cpu_offload,
            sharding_strategy=sharding_strategy,
            state_dict_type=state_dict_type,
            device_mesh=device_mesh,
            limit_all_gathers=limit_all_gathers,
            forward_prefetch=forward_prefetch,
            **kwargs,
        )

    def configure_wrapping(self, module: pl.LightningModule) -> set[type[torch.nn.Module]]:
        """Sets the FSDP units (and activation checkpointing) to the decoder layers of `module`'s models; returns
        their classes. Runs in `setup`, once `configure_model` has built the models."""
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy

        from salsa_lightning.modules.reward import RewardModule
        from salsa_lightning.modules.sft import SFTModule

        # A stage must gather its output through `full_state_dict(model, root=trainer.model)` and run any forward
        # outside training/validation steps through the root (`forward_through_root`): under FSDP1 the module's own
        # parameters are views of this rank's shards. SFT and reward do; PPO runs under FSDP2 (ModelParallelStrategy).
        if not isinstance(module, (SFTModule, RewardModule)):
            raise SalsaError(
                f"DecoderLayerFSDPStrategy (FSDP1) runs the SFT and reward stages, not {type(module).__name__}; shard "
                "PPO with FSDP2 (configs/fsdp/fsdp2-1x8.yaml), or use LoRA/QLoRA on one GPU (docs/distributed.md)."
            )
        models = transformers_models(module)
        classes = decoder_layer_classes(module)
        self.kwargs.setdefault("auto_wrap_policy", ModuleWrapPolicy(classes))  # a policy given in Python wins
        if self.activation_checkpointing:
            if any(m.is_activation_checkpointing for m in models):
                raise SalsaError(
                    "Both the strategy's `activation_checkpointing` and the model's `gradient_checkpointing` are on, "
                    "which recomputes every layer twice; set `model.gradient_checkpointing: false`."
                )
            self._activation_checkpointing_kwargs = {"auto_wrap_policy": ModuleWrapPolicy(classes)}
        return classes

    def setup(self, trainer: pl.Trainer) -> None:
        # the trainer calls `configure_model` before `strategy.setup`, so the layers exist now
        self.configure_wrapping(self.lightning_module)
        if type(self.precision_plugin) is FSDPPrecision:  # the plugin Lightning made from `trainer.precision`
            plugin = self.precision_plugin
            self.precision_plugin = RootClippingFSDPPrecision(plugin.precision, plugin.scaler, strategy=self)
        super().setup(trainer)

    def _setup_model(self, model: torch.nn.Module) -> torch.nn.Module:
        if self.root_device.type != "cpu":
            return super()._setup_model(model)
        # On CPU (gloo; how the tests run it) torch's FSDP1 needs `device_id=cpu`, but Lightning passes the device
        # index, None for a CPU, and FSDP then refuses: "FSDP needs a non-CPU accelerator device". So wrap here
        # with the same arguments; Lightning keeps a wrapped model as it is and adds activation checkpointing.
        from torch.distributed.fsdp import FullyShardedDataParallel

        kwargs = dict(self.kwargs)
        model = FullyShardedDataParallel(
            module=model,
            cpu_offload=self.cpu_offload,
            mixed_precision=self.mixed_precision_config,
            sharding_strategy=self.sharding_strategy,
            device_id=self.root_device,
            **kwargs,
        )
        self.kwargs.pop("auto_wrap_policy", None)  # applied; Lightning would warn that it ignores it
        try:
            return super()._setup_model(model)
        finally:
            self.kwargs = kwargs


__all__ = ["DecoderLayerFSDPStrategy", "RootClippingFSDPPrecision", "decoder_layer_classes", "transformers_models"]
