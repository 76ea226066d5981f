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


def describe_machine() -> str:
    """One line for a benchmark's output: the CPU's name, cores, RAM, OS, and whether bf16 is native here (the speed
    of every bf16 number depends on it; a VM's CPU name often does not say)."""
    import os
    import platform

    try:
        info = Path("/proc/cpuinfo").read_text(errors="ignore")
    except OSError:
        info = ""
    names = [line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")]
    cpu = names[0] if names else platform.processor() or platform.machine()
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    found = [f for f in _BF16_CPU_FLAGS if f in info]
    if torch.cuda.is_available():
        bf16 = "bf16 on the GPU" if fast_bf16() else "no bf16 on the GPU"
    else:
        bf16 = f"native bf16 ({', '.join(found)})" if fast_bf16() else "no native bf16 (float32 runs)"
    return f"{cpu}, {os.cpu_count()} logical CPUs, {mem:.0f} GiB RAM, {platform.system()} {platform.release()}, {bf16}"


if __name__ == "__main__":  # `python -m salsa_lightning.hardware` prints both, for scripts
    print(training_precision(), generation_dtype())
