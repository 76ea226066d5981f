"""Weights cast to the autocast dtype once per block instead of once per call, or (frozen Linear weights of a model
that only ever runs under autocast) once for good: `hold_frozen_linears_in`.

Under `trainer.precision: bf16-mixed` every forward runs in `torch.autocast(..., cache_enabled=False)` (Lightning
turns autocast's weight cache off, which would hand stale casts to a step after `optimizer.step`), and autocast
never caches frozen weights anyway. So each call of an `nn.Linear` reads its float32 weight and writes a bf16 copy
before the matmul: in a decoding loop, where each step is a few rows, that copy is most of the step's memory
traffic, and it is repeated for every generated token. `linear_weights_cast_once` makes the same copies once for a
block that does not train (a `generate`), so the matmuls see exactly the operands autocast would have given them:
the same rounding (`Tensor.to`), the same kernels, the same tokens. Torch and PEFT have no switch for this (the
autocast cache is the one mechanism, and it skips frozen weights by design).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn


def _autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype autocast casts matmul operands to on `device_type`, or None outside autocast."""
    if not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


@contextlib.contextmanager
def linear_weights_cast_once(model: nn.Module) -> Iterator[None]:
    """While the block runs under autocast and without gradients, every float32 `nn.Linear` weight (and bias) of
    `model` is swapped for its copy in autocast's dtype, and put back afterwards (the original tensors, untouched).

    A no-op outside autocast, with gradients on (a swapped weight would not be the parameter autograd trains), and
    for weights that are not float32 (bf16 or 4-bit bases: already what the matmul reads). A weight shared by two
    modules (an LM head tied to the embeddings) is swapped only in the `nn.Linear`; the embedding keeps reading
    float32, as autocast leaves embeddings. Memory: one copy of the Linear weights in the autocast dtype (half
    their float32 size for bf16) while the block runs."""
    param = next(model.parameters(), None)
    dtype = _autocast_dtype(param.device.type) if param is not None else None
    if dtype is None or dtype == torch.float32 or torch.is_grad_enabled():
        yield
        return
    swapped: list[tuple[nn.Module, str, nn.Parameter]] = []
    try:
        for module in model.modules():
            if not isinstance(module, nn.Linear):
                continue
            for name in ("weight", "bias"):
                p = module._parameters.get(name)
                if p is not None and p.dtype == torch.float32:
                    swapped.append((module, name, p))
                    module._parameters[name] = nn.Parameter(p.detach().to(dtype), requires_grad=False)
        yield
    finally:
        for module, name, p in swapped:
            module._parameters[name] = p


def hold_frozen_linears_in(model: nn.Module, dtype: torch.dtype) -> int:
    """Store every frozen float32 `nn.Linear` weight (and bias) of `model` in `dtype` for good, for a model whose
    every forward runs under autocast to `dtype`: each matmul then reads the very operand autocast would have cast
    (`Tensor.to`, the same rounding), so the numbers do not change, while the float32 copy, and the per-forward cast
    with its transient copy (kept for the backward pass, too), are gone. Embeddings, norms and an LM head tied to
    the input embeddings keep float32, as autocast leaves them (the residual stream stays float32). Returns the
    number of tensors cast.

    The other float32 tensors are copied once into memory of their own: a model loaded from safetensors reads its
    weights from a memory map of the file, and while any tensor of it is alive the whole map stays mapped, with every
    page the cast touched counted as resident. Without an owner of its own for them, the float32 pages would stay.
    Only for a model that never runs a float32 forward (one would meet bf16 weights): the caller checks that."""
    tied = model.get_input_embeddings().weight if hasattr(model, "get_input_embeddings") else None
    cast = 0
    with torch.no_grad():
        for module in model.modules():
            if not isinstance(module, nn.Linear) or module.weight is tied:
                continue
            for name in ("weight", "bias"):
                p = module._parameters.get(name)
                if p is not None and p.dtype == torch.float32 and not p.requires_grad:
                    p.data = p.data.to(dtype)
                    cast += 1
        for t in [*model.parameters(), *model.buffers()]:
            if t.dtype == torch.float32:
                t.data = t.data.clone()
    return cast


__all__ = ["hold_frozen_linears_in", "linear_weights_cast_once"]
