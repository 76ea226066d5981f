"""Weights cast to the autocast dtype once per block instead of once per call.

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


__all__ = ["linear_weights_cast_once"]
