"""Sharding with FSDP2 (`torch.distributed.fsdp.fully_shard`) under Lightning's `ModelParallelStrategy`.

Lightning builds the device mesh and hands it to `LightningModule.configure_model`; there a stage calls
`shard_decoder_layers`, which applies `fully_shard` to every decoder layer and then to the root, so that one
layer's weights are gathered at a time. It runs on GPUs (NCCL) and on CPU (gloo), which is how the tests
check it. `full_state_dict` gathers the unsharded weights for the HF-format stage output.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import torch

from salsa_lightning.errors import SalsaError
from salsa_lightning.models.spec import DTYPES


@dataclass
class FSDPSpec:
    """FSDP2 settings, used when the trainer runs `ModelParallelStrategy` (otherwise ignored)."""

    param_dtype: Literal["bfloat16", "float16", "float32"] | None = None
    """Dtype layers compute in after the all-gather (mixed precision); None = the weights' own dtype."""
    reduce_dtype: Literal["bfloat16", "float16", "float32"] | None = "float32"
    """Dtype gradients are reduce-scattered in (float32 keeps the reduction exact under bf16 compute)."""
    cpu_offload: bool = False
    """Keep sharded weights, gradients and optimizer state in CPU memory (slower; for models that do not fit)."""
    reshard_after_forward: bool = True
    """Free each gathered layer after its forward (ZeRO-3); False keeps it until backward (ZeRO-2, faster)."""
    gather_for_generation: bool = True
    """PPO: gather the policy once for a whole rollout `generate` (one all-gather per layer, memory of the full
    policy on every rank while generating) instead of once per layer per generated token."""


def is_sharded(model: torch.nn.Module) -> bool:
    """Whether FSDP2 (`fully_shard`) or FSDP1 (`FullyShardedDataParallel`) shards any part of `model`."""
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel

    return any(isinstance(m, (FSDPModule, FullyShardedDataParallel)) for m in model.modules())


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated blocks of a transformers model (its `_no_split_modules` classes), through any PEFT wrapper."""
    inner = model
    while not hasattr(inner, "_no_split_modules") and hasattr(inner, "base_model") and inner.base_model is not inner:
        inner = inner.base_model
    if hasattr(inner, "model") and not hasattr(inner, "_no_split_modules"):  # peft LoraModel -> transformers model
        inner = inner.model
    names = set(getattr(inner, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise SalsaError(
            f"Cannot find the decoder layers of {type(inner).__name__} to shard (no `_no_split_modules`); "
            "use a transformers model, or the single-device / DDP strategies."
        )
    return layers


def _fsdp_kwargs(device_mesh: Any, spec: FSDPSpec) -> dict[str, Any]:
    """`fully_shard`'s mesh (the data-parallel axis) and mixed-precision policy, for every unit the stages shard."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    names = device_mesh.mesh_dim_names or ()
    if "tensor_parallel" in names and device_mesh["tensor_parallel"].size() > 1:
        # ModelParallelStrategy's "auto" puts every GPU of a node on the tensor-parallel axis; we shard with FSDP only
        raise SalsaError(
            f"The device mesh has tensor_parallel_size={device_mesh['tensor_parallel'].size()}, but the stages shard "
            "with FSDP only; set the strategy's `data_parallel_size` to the number of processes and "
            "`tensor_parallel_size: 1` (see configs/fsdp/)."
        )
    return {
        "mesh": device_mesh["data_parallel"] if "data_parallel" in names else device_mesh,
        "mp_policy": MixedPrecisionPolicy(
            param_dtype=DTYPES.get(spec.param_dtype), reduce_dtype=DTYPES.get(spec.reduce_dtype)
        ),
    }


def shard_decoder_layers(model: torch.nn.Module, device_mesh: Any, spec: FSDPSpec | None = None) -> torch.nn.Module:
    """`fully_shard` each decoder layer, then the whole model (embeddings, final norm, heads), over `device_mesh`
    (Lightning's data-parallel mesh). Activation checkpointing stays the model's own (`gradient_checkpointing`),
    which recomputes inside each sharded layer."""
    from torch.distributed.fsdp import CPUOffloadPolicy, fully_shard

    spec = spec or FSDPSpec()
    if any(type(p).__name__ == "Params4bit" for p in model.parameters()):
        raise SalsaError(
            "A 4-bit (QLoRA) base cannot be sharded with FSDP2 here; run QLoRA on one GPU (configs/qlora/), or shard "
            "a bf16 base (`quantization: none`) across GPUs."
        )
    kwargs: dict[str, Any] = _fsdp_kwargs(device_mesh, spec)
    if spec.cpu_offload:
        kwargs["offload_policy"] = CPUOffloadPolicy()
    for layer in decoder_layers(model):
        fully_shard(layer, reshard_after_forward=spec.reshard_after_forward, **kwargs)
    # The root keeps its parameters (embeddings, final norm, heads) gathered from forward to backward, as FSDP2's
    # own default does: stages read a head's per-token output through a hook (reward.model.token_scores), and
    # that tensor is not one of the root's outputs, on which FSDP would hang the re-gather before backward.
    fully_shard(model, reshard_after_forward=False, **kwargs)
    return model


def full_state_dict(model: torch.nn.Module, root: torch.nn.Module | None = None) -> dict[str, torch.Tensor] | None:
    """The unsharded state dict on CPU, or None for a model that is not sharded — then `save_pretrained` reads the
    model itself. A collective: every rank must call it; rank 0 gets the weights (other ranks may get an empty
    dict).

    `root` is the module the strategy wrapped (`trainer.model`), for a `model` that sits inside it. Under FSDP1
    (Lightning's `FSDPStrategy`) the root's own FSDP unit holds, sharded, every parameter that no inner unit owns
    (embeddings, final norm, LM head), so only a gather from the root sees all the weights; FSDP2 needs no root."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.fsdp import FullyShardedDataParallel

    def clean(name: str) -> str:  # a name in `model`, without FSDP1 / checkpoint-wrapper levels
        wrappers = {"_fsdp_wrapped_module", "_checkpoint_wrapped_module"}
        return ".".join(part for part in name.split(".") if part not in wrappers)

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    if isinstance(root, FullyShardedDataParallel):
        if root.compute_device.type == "cpu":
            # offloading to CPU a model that already is on CPU crashes FSDP1's gather (SIGSEGV on rank 0, torch 2.13)
            options = StateDictOptions(full_state_dict=True, cpu_offload=False)
        path = next((name for name, m in root.named_modules() if m is model), None)
        if path is None:
            raise ValueError(f"{type(model).__name__} is not inside the FSDP root it was given")
        prefix = clean(path) + "." if clean(path) else ""
        state = {
            k[len(prefix) :]: v for k, v in get_model_state_dict(root, options=options).items() if k.startswith(prefix)
        }
    elif is_sharded(model):
        fsdp1_inside = any(isinstance(m, FullyShardedDataParallel) for m in model.modules())
        if fsdp1_inside and not isinstance(model, FullyShardedDataParallel):
            # the parameters outside the inner units live, sharded, in an outer unit this function cannot see
            raise ValueError("An FSDP1-wrapped model needs its FSDP root: full_state_dict(model, root=trainer.model)")
        state = get_model_state_dict(model, options=options)
    else:
        return None
    # The gather returns tied weights (embeddings / LM head) as separate tensors; point them back at one tensor,
    # as in the module, so that `save_pretrained` recognises the tie and writes the weight once.
    first: dict[int, str] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        name = clean(name)
        if id(param) in first and name in state and first[id(param)] in state:
            state[name] = state[first[id(param)]]
        first.setdefault(id(param), name)
    return state


def uses_fsdp2(module) -> bool:
    """Whether the module's trainer runs Lightning's `ModelParallelStrategy` (FSDP2)."""
    from lightning.pytorch.strategies import ModelParallelStrategy

    trainer = getattr(module, "_trainer", None)
    return trainer is not None and isinstance(trainer.strategy, ModelParallelStrategy)


def shard_module(module: torch.nn.Module, device_mesh: Any, spec: FSDPSpec | None = None) -> torch.nn.Module:
    """`fully_shard` a small module on its own (a linear head outside any transformers model): its gradients are
    then reduced across ranks like every other parameter's, and gradient clipping sees one kind of tensor."""
    from torch.distributed.fsdp import fully_shard

    return fully_shard(module, reshard_after_forward=False, **_fsdp_kwargs(device_mesh, spec or FSDPSpec()))


@contextmanager
def gathered(model: torch.nn.Module, spec: FSDPSpec | None = None):
    """Within the block, each FSDP unit of `model` stays gathered after its first forward (one all-gather per
    layer for a whole `generate`, instead of one per layer per new token); on exit every unit is resharded and
    the settings `shard_decoder_layers` gave are restored. A no-op for a model that is not sharded."""
    from torch.distributed.fsdp import FSDPModule

    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    inner = {id(m) for unit in units for m in unit.modules() if m is not unit}
    for unit in units:
        unit.set_reshard_after_forward(False, recurse=False)
    try:
        yield model
    finally:
        spec = spec or FSDPSpec()
        for unit in units:
            unit.reshard()
            # the outermost units keep their parameters to backward, as shard_decoder_layers set them
            unit.set_reshard_after_forward(spec.reshard_after_forward if id(unit) in inner else False, recurse=False)


def forward_through_root(module, method: str, *args: Any) -> Any:
    """`module.<method>(*args)` run inside the forward of the FSDP1 root the strategy wrapped `module` in, as Lightning
    runs training and validation steps (its forward redirection), so that the root's sharded parameters
    (embeddings, head) are gathered; outside FSDP1 a plain call."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    trainer = getattr(module, "_trainer", None)
    root = trainer.model if trainer is not None else None
    if not isinstance(root, FullyShardedDataParallel):
        return getattr(module, method)(*args)
    return trainer.strategy._forward_redirection(root, module, method, *args)  # Lightning's own mechanism


def world_size() -> int:
    return (
        torch.distributed.get_world_size()
        if torch.distributed.is_available() and torch.distributed.is_initialized()
        else 1
    )


def sum_over_ranks(t: torch.Tensor) -> torch.Tensor:
    """The element-wise sum of `t` over all processes (a collective: every rank calls it); `t` itself unsharded."""
    if world_size() == 1:
        return t
    out = t.clone()
    torch.distributed.all_reduce(out, op=torch.distributed.ReduceOp.SUM)
    return out


def mean_over_ranks(
    metrics: dict[str, torch.Tensor], counts: tuple[str, ...] = (), exact: tuple[str, ...] = ()
) -> dict[str, torch.Tensor]:
    """Data-parallel runs: per-rank batch means turned into the global batch's means (each rank holds an equal share,
    so the mean of the ranks' means is the batch mean) in one collective; `counts` are summed instead; `exact` are
    already global statistics (computed from reduced moments) and pass through."""
    n = world_size()
    if n == 1:
        return metrics
    keys = [k for k in metrics if k not in exact]
    device = next((v.device for v in metrics.values() if isinstance(v, torch.Tensor)), None)
    stacked = torch.stack([torch.as_tensor(metrics[k], dtype=torch.float32, device=device) for k in keys])
    reduced = sum_over_ranks(stacked)
    out = {k: (v if k in counts else v / n) for k, v in zip(keys, reduced.unbind(), strict=True)}
    return {**out, **{k: metrics[k] for k in exact if k in metrics}}


def any_rank(flag: bool, device: torch.device | str = "cpu") -> bool:
    """True on every rank when it is true on any: a rank must never skip a step the others take."""
    if world_size() == 1:
        return flag
    return bool(sum_over_ranks(torch.tensor(float(flag), device=device)) > 0)


__all__ = [
    "FSDPSpec",
    "any_rank",
    "mean_over_ranks",
    "sum_over_ranks",
    "decoder_layers",
    "forward_through_root",
    "full_state_dict",
    "gathered",
    "is_sharded",
    "shard_decoder_layers",
    "shard_module",
    "uses_fsdp2",
    "world_size",
]
