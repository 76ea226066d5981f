"""Full-weight soup: `θ_soup = Σ_i w_i θ_i`, tensor by tensor (paper eq. 3).

The math is `weighted_sum` (one tensor); `soup_state_dicts` applies it to state dicts in memory and
`write_full_soup` streams it through safetensors files, holding one output tensor (float32) and one input
tensor at a time, so peak memory does not grow with the number of inputs or the model size.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from salsa_lightning.errors import SalsaError
from salsa_lightning.soup.inputs import FULL_INDEX, SoupInput
from salsa_lightning.soup.streaming import (
    DTYPES,
    FLOAT_CODES,
    SafetensorsReader,
    StreamingSafetensorsWriter,
    TensorInfo,
    open_safetensors,
    read_header,
)
from salsa_lightning.soup.weights import resolve_weights

# Verification reads these back in float64; larger tensors (embeddings) are left to the shape/key checks.
_VERIFY_MAX_NUMEL = 1 << 22
# Fields of config.json that decide whether two checkpoints are the same network.
_ARCH_FIELDS = ("model_type", "architectures", "hidden_size", "num_hidden_layers", "vocab_size", "tie_word_embeddings")


def weighted_sum(
    tensors: Iterable[torch.Tensor],
    weights: Sequence[float],
    out_dtype: torch.dtype | None = None,
    workspace: torch.Tensor | None = None,
) -> torch.Tensor:
    """`Σ_i w_i t_i`, accumulated in float32 and returned in `out_dtype` (default: the first tensor's dtype).

    `tensors` may be a generator, so a caller can load one input at a time, even into one reused buffer.
    `workspace`, a flat float32 tensor with at least `numel` elements, is used as the accumulator instead
    of a new allocation (then the result may be a view of it). Float64 inputs accumulate in float64.
    Non-float tensors (integer buffers) are not averaged: they must be equal and are returned as is.
    """
    acc: torch.Tensor | None = None
    first: torch.Tensor | None = None
    for t, w in zip(tensors, weights, strict=True):
        if first is None:
            out_dtype = out_dtype or t.dtype
            if not t.is_floating_point():
                first = t.clone()  # t may live in a buffer that the next input overwrites
                continue
            first = t
            acc_dtype = torch.float64 if t.dtype == torch.float64 else torch.float32
            if workspace is not None and workspace.dtype == acc_dtype:
                acc = workspace[: t.numel()].view(t.shape)
            else:
                acc = torch.empty(t.shape, dtype=acc_dtype)
            if t.dtype == acc_dtype:
                torch.mul(t, w, out=acc)
            else:  # widen first: a mixed-dtype mul would round to t's dtype before writing into acc
                acc.copy_(t)
                acc.mul_(w)
            continue
        if first.shape != t.shape:
            raise SalsaError(f"Cannot average tensors of shapes {tuple(first.shape)} and {tuple(t.shape)}.")
        if acc is None:
            if not torch.equal(first, t):
                raise SalsaError("Non-float tensors (integer buffers) differ between inputs; they cannot be averaged.")
            continue
        acc.add_(t, alpha=w)  # promotes t to acc's dtype inside the kernel, no temporary
    if first is None:
        raise SalsaError("The soup got no inputs; list at least one SFT output directory under `inputs`.")
    return first if acc is None else acc.to(out_dtype)


def check_same_tensors(names: Sequence[str], specs: Sequence[Mapping[str, tuple[Any, tuple[int, ...]]]]) -> None:
    """Raise a `SalsaError` unless every input has the same tensor names and shapes as the first.

    `specs[i]` maps tensor name -> (dtype, shape) for input `names[i]`.
    """
    ref = specs[0]
    for name, spec in zip(names[1:], specs[1:], strict=True):
        only_ref = sorted(set(ref) - set(spec))
        only_this = sorted(set(spec) - set(ref))
        if only_ref or only_this:
            detail = "; ".join(
                s
                for s in (
                    f"only in {names[0]}: {only_ref[:3]}" if only_ref else "",
                    f"only in {name}: {only_this[:3]}" if only_this else "",
                )
                if s
            )
            raise SalsaError(
                f"The inputs {names[0]} and {name} have different tensors ({detail}); soup only checkpoints of "
                "the same architecture, fine-tuned from the same base."
            )
        for key, (_, shape) in ref.items():
            if tuple(spec[key][1]) != tuple(shape):
                raise SalsaError(
                    f"The tensor {key} has shape {tuple(shape)} in {names[0]} but {tuple(spec[key][1])} in {name}; "
                    "soup only checkpoints of the same architecture."
                )


def soup_state_dicts(
    state_dicts: Sequence[Mapping[str, torch.Tensor]],
    weights: Sequence[float] | None = None,
    *,
    allow_extrapolation: bool = False,
) -> dict[str, torch.Tensor]:
    """The soup `Σ_i w_i θ_i` of in-memory state dicts (same keys and shapes), in the first one's dtypes.

    Weights default to uniform and are validated by `resolve_weights`. Used to build a soup anchor in
    memory and by the reward-landscape analysis (with `allow_extrapolation=True`).
    """
    w = resolve_weights(len(state_dicts), weights, allow_extrapolation=allow_extrapolation)
    specs = [{k: (v.dtype, tuple(v.shape)) for k, v in sd.items()} for sd in state_dicts]
    check_same_tensors([f"state dict {i}" for i in range(len(state_dicts))], specs)
    return {k: weighted_sum((sd[k] for sd in state_dicts), w) for k in state_dicts[0]}


@dataclass
class FullPlan:
    """The validated layout of a full-weight soup: for each tensor, where it lives in every input."""

    inputs: list[SoupInput]
    tensors: dict[str, list[TensorInfo]]
    """tensor name -> its location in each input; in the order of the first input's files."""
    out_files: dict[str, list[str]]
    """output file name -> tensor names it holds (the first input's sharding)."""


def _check_configs(inputs: Sequence[SoupInput]) -> None:
    ref = inputs[0]
    for other in inputs[1:]:
        if ref.hf_config is None or other.hf_config is None:
            continue
        diff = [f for f in _ARCH_FIELDS if ref.hf_config.get(f) != other.hf_config.get(f)]
        if diff:
            f = diff[0]
            raise SalsaError(
                f"The inputs {ref.path} and {other.path} have different architectures "
                f"({f}: {ref.hf_config.get(f)!r} vs {other.hf_config.get(f)!r}); soup only fine-tunes of one base model."
            )


def plan_full_soup(inputs: Sequence[SoupInput]) -> FullPlan:
    """Read every input's safetensors headers (no tensor data) and check that the inputs can be souped."""
    _check_configs(inputs)
    layouts: list[dict[str, TensorInfo]] = []
    out_files: dict[str, list[str]] = {}
    for i, inp in enumerate(inputs):
        layout: dict[str, TensorInfo] = {}
        for f in inp.weight_files:
            infos, meta = read_header(f)
            if meta.get("format") not in (None, "pt"):
                raise SalsaError(f"{f} was saved by {meta['format']!r}, not PyTorch; re-save it with transformers.")
            layout.update(infos)
            if i == 0:
                out_files[f.name] = list(infos)
        if inp.index is not None:
            listed = set(inp.index.get("weight_map", {}))
            if listed != set(layout):
                raise SalsaError(
                    f"The index of {inp.path} does not match its shards ({len(listed)} vs {len(layout)} tensors); "
                    "re-save the model with save_pretrained."
                )
        layouts.append(layout)
    check_same_tensors(
        [str(i.path) for i in inputs], [{k: (v.dtype, v.shape) for k, v in lay.items()} for lay in layouts]
    )
    for name, info in layouts[0].items():
        kinds = {lay[name].dtype in FLOAT_CODES for lay in layouts}
        if len(kinds) > 1:
            raise SalsaError(f"The tensor {name} is a float in some inputs and an integer in others; re-save them.")
        if info.dtype not in DTYPES:
            raise SalsaError(f"The tensor {name} has dtype {info.dtype}, which the soup does not handle.")
    tensors = {name: [lay[name] for lay in layouts] for f in out_files.values() for name in f}
    return FullPlan(list(inputs), tensors, out_files)


def _sample_names(names: Sequence[str], k: int) -> list[str]:
    """`k` names spread evenly over `names` (first and last included): the layers we verify."""
    if len(names) <= k:
        return list(names)
    return [names[round(j * (len(names) - 1) / (k - 1))] for j in range(k)] if k > 1 else [names[0]]


def write_full_soup(
    plan: FullPlan,
    weights: Sequence[float],
    out_dir: Path,
    on_tensor: Callable[[str], None] | None = None,
    verify_samples: int = 8,
    allow_nonfinite: bool = False,
) -> dict[str, Any]:
    """Stream the soup into `out_dir` (same file layout as the first input); returns files and the check result.

    Memory: one float32 accumulator and one read buffer, each the size of the largest tensor, reused for
    every tensor. After writing, `verify_samples` float tensors spread over the model (those of at most
    `_VERIFY_MAX_NUMEL` elements, to keep the check cheap) are read back with the stock safetensors reader
    and compared with a float64 naive weighted sum rounded to the output dtype.
    """
    max_numel = max(math.prod(infos[0].shape) for infos in plan.tensors.values())
    max_bytes = max(_nbytes(info) for infos in plan.tensors.values() for info in infos)
    workspace = torch.empty(max_numel, dtype=torch.float32)
    buf = torch.empty(max_bytes, dtype=torch.uint8)
    with contextlib.ExitStack() as stack:
        # Memory-bound elementwise work gains nothing from intra-op threads, and they fight the input-hashing
        # thread (and anyone else) for cores: OpenMP barriers under contention made add_ ~10x slower here.
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        stack.callback(torch.set_num_threads, threads)
        readers: dict[Path, SafetensorsReader] = {}
        for inp in plan.inputs:
            for f in inp.weight_files:
                readers[f] = SafetensorsReader(f)
                stack.callback(readers[f].close)
        for fname, names in plan.out_files.items():
            specs = [(n, plan.tensors[n][0].dtype, plan.tensors[n][0].shape) for n in names]
            with StreamingSafetensorsWriter(out_dir / fname, specs, {"format": "pt"}) as writer:
                for name in names:
                    infos = plan.tensors[name]
                    # one input at a time, each read into `buf` once the previous one has been added
                    tensors = (readers[info.file].read(name, buf) for info in infos)
                    out = weighted_sum(tensors, weights, DTYPES[infos[0].dtype], workspace)
                    if not allow_nonfinite and out.is_floating_point() and not torch.isfinite(out).all():
                        _refuse_nonfinite(name, infos, readers, buf)
                    writer.write(name, out)
                    if on_tensor is not None:
                        on_tensor(name)
    del workspace, buf
    if len(plan.out_files) > 1:
        index = {
            "metadata": {"total_size": sum(_nbytes(info[0]) for info in plan.tensors.values())},
            "weight_map": {n: fname for fname, names in plan.out_files.items() for n in names},
        }
        (out_dir / FULL_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")

    floats = [n for n, infos in plan.tensors.items() if infos[0].dtype in FLOAT_CODES]
    candidates = [n for n in floats if math.prod(plan.tensors[n][0].shape) <= _VERIFY_MAX_NUMEL]
    if not candidates and floats:
        candidates = [min(floats, key=lambda n: math.prod(plan.tensors[n][0].shape))]
    sample = _sample_names(candidates, verify_samples)
    out_file_of = {n: fname for fname, names in plan.out_files.items() for n in names}
    max_err = 0.0
    for name in sample:
        infos = plan.tensors[name]
        ref = torch.zeros(infos[0].shape, dtype=torch.float64)
        for info, w in zip(infos, weights, strict=True):
            with open_safetensors(info.file) as f:
                ref += w * f.get_tensor(name).double()
        ref = ref.to(DTYPES[infos[0].dtype]).double()  # the best the output dtype can hold
        with open_safetensors(out_dir / out_file_of[name]) as f:
            got = f.get_tensor(name).double()
        max_err = worst_error(max_err, _rel_error(got, ref, allow_nonfinite))
    files = list(plan.out_files) + ([FULL_INDEX] if len(plan.out_files) > 1 else [])
    return {"files": files, "verified_tensors": sample, "max_rel_error": max_err}


def _nbytes(info: TensorInfo) -> int:
    return math.prod(info.shape) * torch.empty((), dtype=DTYPES[info.dtype]).element_size()


def _refuse_nonfinite(name: str, infos, readers, buf) -> None:
    """The soup of tensor `name` is not finite: say which input holds the NaN/inf (or that the sum overflowed)."""
    for info in infos:
        if not torch.isfinite(readers[info.file].read(name, buf)).all():
            raise SalsaError(
                f"Tensor {name} of {info.file} holds NaN or inf, which the soup would inherit; fix or drop that input, "
                "or set `allow_nonfinite: true` to soup it anyway."
            )
    raise SalsaError(
        f"The weighted sum of tensor {name} overflows its dtype {infos[0].dtype}; check the weights and inputs."
    )


def worst_error(a: float, b: float) -> float:
    """The larger of two verification errors, NaN if either is (Python's `max` would keep the old value)."""
    return math.nan if math.isnan(a) or math.isnan(b) else max(a, b)


def _rel_error(got: torch.Tensor, ref: torch.Tensor, allow_nonfinite: bool = False) -> float:
    """`‖got - ref‖_F / ‖ref‖_F` (absolute error when the reference is zero); NaN when either side is not finite,
    unless `allow_nonfinite`: then both must be non-finite at the same places, and the rest is compared."""
    finite = torch.isfinite(ref) & torch.isfinite(got)
    if not finite.all():
        if not allow_nonfinite or not torch.equal(torch.isfinite(ref), torch.isfinite(got)):
            return math.nan
        got, ref = got[finite], ref[finite]
    denom = ref.norm().item()
    err = (got - ref).norm().item()
    return err / denom if denom > 0 else err
