"""Full-weight models loaded straight into FSDP2 shards — and the soup built shard by shard.

Each rank builds the network on the meta device, shards it (`distributed.shard_decoder_layers`), and then
reads from every input's safetensors files only the rows its shard of each tensor holds, averaging them in
float32 (`full.weighted_sum`, the soup's one formula). No rank ever holds a full copy of a model: not of an
input and not of the soup. A single input with weight 1 is a plain sharded load.

Written by hand because transformers' `from_pretrained` loads whole tensors (its `device_mesh` support is
for tensor parallelism), and torch's distributed-checkpoint loaders read DCP directories, not a set of HF
safetensors files to be averaged.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from salsa_lightning.distributed import FSDPSpec, shard_decoder_layers
from salsa_lightning.errors import SalsaError
from salsa_lightning.models.loading import ModelSpec, resolve_dtype, resolve_model_path
from salsa_lightning.soup.full import plan_full_soup, weighted_sum
from salsa_lightning.soup.inputs import describe_input
from salsa_lightning.soup.streaming import open_safetensors


def local_rows(param: torch.Tensor) -> tuple[int, int]:
    """[start, stop) of dim 0 that this rank's shard of `param` holds. FSDP2 shards dim 0 like `torch.chunk`:
    ceil(n / world) rows per rank, the last ranks possibly fewer or none."""
    from torch.distributed.tensor import DTensor, Shard

    if not isinstance(param, DTensor):
        return 0, param.shape[0]
    if len(param.placements) != 1 or param.placements[0] != Shard(0):
        raise SalsaError(f"Expected a tensor sharded on dim 0 over one mesh axis, got {param.placements}.")
    mesh = param.device_mesh
    n, rank = mesh.size(), mesh.get_local_rank()
    chunk = math.ceil(param.shape[0] / n)
    start = min(rank * chunk, param.shape[0])
    return start, min(start + chunk, param.shape[0])


def load_sharded(
    model_cls: Any,
    inputs: Sequence[str],
    weights: Sequence[float],
    spec: ModelSpec,
    device_mesh: Any,
    fsdp: FSDPSpec,
    missing_ok: Callable[[str], bool] = lambda name: False,
    **config_overrides: Any,
) -> torch.nn.Module:
    """`model_cls` (an `AutoModelFor...` class) with the weights `Σ w_i θ_i` of the full-weight directories
    `inputs`, sharded over `device_mesh`. Parameters for which `missing_ok(name)` holds and that no input has
    (a new `score` head) start at zero. Returns the model in eval mode with no parameter requiring grad."""
    from accelerate import init_empty_weights
    from torch.distributed.tensor import DTensor
    from transformers import AutoConfig

    paths = [resolve_model_path(p) for p in inputs]
    described = [describe_input(p) for p in paths]
    if any(d.format != "full" for d in described):
        raise SalsaError(f"load_sharded reads full-weight directories only; got an adapter among {list(inputs)}.")
    plan = plan_full_soup(described)  # same tensors, shapes and architecture in every input, from headers only
    config = AutoConfig.from_pretrained(paths[0], trust_remote_code=spec.trust_remote_code, **config_overrides)
    kwargs = {"attn_implementation": spec.attn_implementation} if spec.attn_implementation else {}
    # parameters on meta; buffers (rotary frequencies) are computed for real, since no checkpoint holds them
    with init_empty_weights(include_buffers=False):
        model = model_cls.from_config(
            config, dtype=resolve_dtype(spec.dtype), trust_remote_code=spec.trust_remote_code, **kwargs
        )
    model.tie_weights()  # from_config leaves a tied LM head separate (from_pretrained ties while loading)
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    shard_decoder_layers(model, device_mesh, fsdp)
    device = (
        torch.device(device_mesh.device_type, torch.cuda.current_device())
        if device_mesh.device_type == "cuda"
        else "cpu"
    )
    model.to_empty(device=device)
    with torch.no_grad(), contextlib.ExitStack() as files:
        for name, buf in buffers.items():
            model.get_buffer(name).copy_(buf)
        handles: dict[Any, Any] = {}

        def rows(info, tensor: str, start: int, stop: int) -> torch.Tensor:
            if info.file not in handles:
                handles[info.file] = files.enter_context(open_safetensors(info.file))
            sl = handles[info.file].get_slice(tensor)
            return sl[start:stop]

        for name, param in model.named_parameters():
            local = param.to_local() if isinstance(param, DTensor) else param
            infos = plan.tensors.get(name)
            if infos is None:
                if not missing_ok(name):
                    raise SalsaError(
                        f"{inputs[0]} has no tensor {name} for a {model_cls.__name__}; pass a stage output of that "
                        "kind (or load it without FSDP)."
                    )
                local.zero_()
                continue
            if not local.numel():  # more ranks than rows: this rank holds none of the tensor
                continue
            start, stop = local_rows(param)
            souped = weighted_sum((rows(i, name, start, stop) for i in infos), weights, out_dtype=local.dtype)
            local.copy_(souped.to(local.device).view(local.shape))
    model.requires_grad_(False)
    return model.eval()


def load_sharded_causal_lm(spec: ModelSpec, device_mesh: Any, fsdp: FSDPSpec) -> torch.nn.Module:
    """A trainable full-weight causal LM read straight into FSDP2 shards (full-weight SFT), with the model's
    activation checkpointing when `spec.gradient_checkpointing` is set — what `load_causal_lm` gives, sharded."""
    from transformers import AutoModelForCausalLM

    from salsa_lightning.models.quantization import refuse_full_weights

    refuse_full_weights(spec, f"Fine-tuning {spec.name_or_path} without `lora`")
    model = load_sharded(AutoModelForCausalLM, [spec.name_or_path], [1.0], spec, device_mesh, fsdp)
    if spec.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model.requires_grad_(True)


__all__ = ["load_sharded", "load_sharded_causal_lm", "local_rows"]
