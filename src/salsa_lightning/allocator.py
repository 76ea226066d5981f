"""The C allocator's share of peak memory on CPU, and the one setting that removes most of it.

On CPU, PyTorch takes tensor memory from the C allocator. glibc serves a block of at least `M_MMAP_THRESHOLD` bytes
(128 KiB at start) with its own `mmap`, unmapped on `free` — but each such `free` raises the threshold to the freed
block's size (up to 32 MiB on 64-bit). After the first forward pass frees its activations, blocks of up to 32 MiB
come from the heap arenas instead, and a heap hands memory back to the OS only from its top: the activations of one
update stay resident after they are freed, and the next phase, whose blocks have other sizes, adds to them. On the
embedded SmolLM2-135M (PPO, LoRA layout, batch 8 × 32 new tokens) that kept 4.2 GB resident between updates with
0.4 GB live; pinned, 1.3 GB (`benchmarks/ppo_memory_phases.py`). Setting the threshold explicitly turns the
adjustment off, so large blocks keep going back to the OS when freed; the cost is a page fault per page of each new
large block.

`SALSA_MMAP_THRESHOLD` (bytes) sets the threshold the CLI pins at start; 0 leaves glibc's own behaviour. An
allocator setting of the user's own (`MALLOC_MMAP_THRESHOLD_`, or another allocator preloaded) is left alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

DEFAULT_MMAP_THRESHOLD = 128 << 10  # glibc's own starting value, kept (1 MiB kept ~0.25 GB more resident)
_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number


def pin_mmap_threshold(nbytes: int | None = None) -> bool:
    """Pin glibc's mmap threshold to `nbytes` (default: `SALSA_MMAP_THRESHOLD`, else 128 KiB). Returns whether it
    was set (False: not glibc, 0 requested, or the user configured the allocator already)."""
    if nbytes is None:
        nbytes = int(os.environ.get("SALSA_MMAP_THRESHOLD", DEFAULT_MMAP_THRESHOLD))
    if nbytes <= 0 or "MALLOC_MMAP_THRESHOLD_" in os.environ or "LD_PRELOAD" in os.environ:
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (macOS, Windows, musl without mallopt)
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, int(nbytes)))


__all__ = ["DEFAULT_MMAP_THRESHOLD", "pin_mmap_threshold"]
