"""What the machine computes fast: the quickstart's configs ask for bf16, which is ~2.5x faster than float32 on GPUs
and on CPUs with AVX512-BF16 or AMX, but ~15x SLOWER on CPUs without them (measured: a 64x576 @ 576x1536 matmul,
1.1 s fp32 vs 18.9 s bf16 for 200 repeats on an AVX2 AMD EPYC), where torch emulates it."""

from __future__ import annotations

from pathlib import Path

import torch

_BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


def fast_bf16() -> bool:
    """True on a CUDA GPU with bf16, or a CPU with native bf16 matmuls (Linux: the cpuinfo flags)."""
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.is_file():
        return False
    flags = cpuinfo.read_text(errors="ignore")
    return any(flag in flags for flag in _BF16_CPU_FLAGS)


def training_precision() -> str:
    """Lightning's `trainer.precision` for this machine: bf16 autocast where it is fast, float32 otherwise."""
    return "bf16-mixed" if fast_bf16() else "32-true"


def generation_dtype() -> str:
    """`dtype` for evaluate/landscape generation on this machine (see `training_precision`)."""
    return "bfloat16" if fast_bf16() else "float32"


if __name__ == "__main__":  # `python -m salsa_lightning.hardware` prints both, for scripts
    print(training_precision(), generation_dtype())
