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
from salsa_lightning.models.loading import ModelSpec, enable_gradient_checkpointing, resolve_dtype, resolve_model_path
from salsa_lightning.soup.full import plan_full_soup, weighted_sum
from salsa_lightning.soup.inputs import describe_input
from salsa_lightning.soup.streaming import open_safetensors


def shard_rows(n_rows: int, world: int, rank: int) -> tuple[int, int]:
    """[start, stop) of dim 0 that `rank` of `world` holds when FSDP2 shards `n_rows` rows: like `torch.chunk`,
    ceil(n / world) rows per rank, the last ranks possibly fewer or none (FSDP2 pads them internally)."""
    chunk = math.ceil(n_rows / world)
    start = min(rank * chunk, n_rows)
    return start, min(start + chunk, n_rows)


def local_rows(param: torch.Tensor) -> tuple[int, int]:
    """[start, stop) of dim 0 that this rank's shard of `param` (a DTensor sharded on dim 0, or a plain tensor:
    all rows) holds."""
    from torch.distributed.tensor import DTensor, Shard

    if not isinstance(param, DTensor):
        return 0, param.shape[0]
    if len(param.placements) != 1 or param.placements[0] != Shard(0):
        raise SalsaError(f"Expected a tensor sharded on dim 0 over one mesh axis, got {param.placements}.")
    mesh = param.device_mesh
    return shard_rows(param.shape[0], mesh.size(), mesh.get_local_rank())


def empty_model(model_cls: Any, path: str, spec: ModelSpec, **config_overrides: Any) -> torch.nn.Module:
    """`model_cls` built from `path`'s config with its parameters on the meta device (no memory) and its buffers
    (rotary frequencies, which no checkpoint holds) computed for real; tied weights tied."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path, trust_remote_code=spec.trust_remote_code, **config_overrides)
    kwargs = {"attn_implementation": spec.attn_implementation} if spec.attn_implementation else {}
    with init_empty_weights(include_buffers=False):
        model = model_cls.from_config(
            config, dtype=resolve_dtype(spec.dtype), trust_remote_code=spec.trust_remote_code, **kwargs
        )
    model.tie_weights()  # from_config leaves a tied LM head separate (from_pretrained ties while loading)
    return model


def is_on_meta(model: torch.nn.Module) -> bool:
    return any(p.is_meta for p in model.parameters())


RowReader = Callable[[str, int, int], torch.Tensor | None]
"""(parameter name, start, stop) -> rows [start, stop) of that parameter's full value, or None if it has none."""


def materialize_sharded(
    model: torch.nn.Module, shard: Callable[[torch.nn.Module], Any], device_type: str, read_rows: RowReader
) -> torch.nn.Module:
    """Shard `model` (its parameters on meta, or some real: those are kept), allocate only each rank's shards, and
    fill every parameter's shard with the rows `read_rows` gives (real parameters not read are copied back)."""
    from torch.distributed.tensor import DTensor

    kept = {
        name: t.detach().clone() for name, t in [*model.named_buffers(), *model.named_parameters()] if not t.is_meta
    }
    shard(model)
    device = torch.device("cuda", torch.cuda.current_device()) if device_type == "cuda" else torch.device("cpu")
    model.to_empty(device=device)
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name in kept:
                buf.copy_(kept[name])
        for name, param in model.named_parameters():
            local = param.to_local() if isinstance(param, DTensor) else param
            if not local.numel():  # more ranks than rows: this rank holds none of the tensor
                continue
            start, stop = local_rows(param)
            rows = read_rows(name, start, stop)
            if rows is None:
                if name not in kept:
                    raise SalsaError(f"No weights for {name}; pass a stage output of the model's kind.")
                rows = kept[name][start:stop]
            local.copy_(rows.to(device=local.device, dtype=local.dtype).view(local.shape))
    return model


class CheckpointRows:
    """Row reads from the safetensors files of full-weight directories, averaged with `weights` (one input: a plain
    read). `plan` validates that the inputs hold the same tensors (headers only). Use as a context manager."""

    def __init__(self, inputs: Sequence[str], weights: Sequence[float] | None = None):
        paths = [resolve_model_path(p) for p in inputs]
        described = [describe_input(p) for p in paths]
        if any(d.format != "full" for d in described):
            raise SalsaError(f"Reading into shards needs full-weight directories; got an adapter among {list(inputs)}.")
        self.plan = plan_full_soup(described)  # same tensors, shapes and architecture in every input
        self.weights = list(weights or [1.0])
        self._files = contextlib.ExitStack()
        self._handles: dict[Any, Any] = {}

    def __enter__(self) -> CheckpointRows:
        return self

    def __exit__(self, *exc) -> None:
        self._files.close()

    def __call__(self, name: str, start: int, stop: int) -> torch.Tensor | None:
        infos = self.plan.tensors.get(name)
        if infos is None:
            return None

        def read(info) -> torch.Tensor:
            if info.file not in self._handles:
                self._handles[info.file] = self._files.enter_context(open_safetensors(info.file))
            return self._handles[info.file].get_slice(name)[start:stop]

        return weighted_sum((read(i) for i in infos), self.weights)


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
    model = empty_model(model_cls, resolve_model_path(inputs[0]), spec, **config_overrides)
    with CheckpointRows(inputs, weights) as checkpoint:
        shapes = {name: p.shape for name, p in model.named_parameters()}

        def rows_or_zeros(name: str, start: int, stop: int) -> torch.Tensor | None:
            rows = checkpoint(name, start, stop)
            if rows is None and missing_ok(name):
                return torch.zeros((stop - start, *shapes[name][1:]))
            if rows is None:
                raise SalsaError(
                    f"{inputs[0]} has no tensor {name} for a {model_cls.__name__}; pass a stage output of that kind "
                    "(or load it without FSDP)."
                )
            return rows

        materialize_sharded(model, lambda m: shard_decoder_layers(m, device_mesh, fsdp), device_mesh.device_type,
                            rows_or_zeros)  # fmt: skip
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
        enable_gradient_checkpointing(model)
    return model.requires_grad_(True)


__all__ = [
    "CheckpointRows",
    "empty_model",
    "is_on_meta",
    "load_sharded",
    "load_sharded_causal_lm",
    "local_rows",
    "shard_rows",
    "materialize_sharded",
]
