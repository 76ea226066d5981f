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

Two remedies: `release_freed_memory` (`malloc_trim`) between PPO's phases, always on, cheap; and pinning the
threshold, off by default because every large block then costs page faults and an munmap: `SALSA_MMAP_THRESHOLD`
(bytes, e.g. 131072) makes the CLI pin it at start. An allocator setting of the user's own
(`MALLOC_MMAP_THRESHOLD_`, or another allocator preloaded) is left alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os

DEFAULT_MMAP_THRESHOLD = 0  # off: pinned at 128 KiB it cut the LoRA peak further but cost ~40% more CPU time in
# page faults and munmap (sys time 0.39x user time against 0.04x); `release_freed_memory` is the cheap part
_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number


@functools.cache  # find_library runs `ldconfig -p` in a subprocess on Linux: once, not at every trim
def _libc():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def release_freed_memory() -> bool:
    """glibc: hand the free pages inside the heaps back to the OS (`malloc_trim(0)`, a few ms). Called between PPO's
    phases, so that what one phase freed does not stay resident beside what the next one allocates. Returns whether
    anything was released (False off glibc)."""
    trim = getattr(_libc(), "malloc_trim", None)
    return bool(trim(0)) if trim is not None else False


def pin_mmap_threshold(nbytes: int | None = None) -> bool:
    """Pin glibc's mmap threshold to `nbytes` (default: `SALSA_MMAP_THRESHOLD`, else off). Returns whether it
    was set (False: not glibc, 0 requested, or the user configured the allocator already)."""
    if nbytes is None:
        nbytes = int(os.environ.get("SALSA_MMAP_THRESHOLD", DEFAULT_MMAP_THRESHOLD))
    if nbytes <= 0 or "MALLOC_MMAP_THRESHOLD_" in os.environ or "LD_PRELOAD" in os.environ:
        return False
    mallopt = getattr(_libc(), "mallopt", None)
    if mallopt is None:  # not glibc (macOS, Windows)
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, int(nbytes)))


__all__ = ["DEFAULT_MMAP_THRESHOLD", "pin_mmap_threshold", "release_freed_memory"]
