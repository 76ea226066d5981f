"""What the stages that load frozen models and generate from them (`evaluate`, `landscape`, the soup report) share:
the device they run on, a frozen model loaded onto it, its memory given back, a progress bar, and the cheap
identity of a model's weights that their response caches are keyed by."""

from __future__ import annotations

import gc
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from salsa_lightning.models.loading import (
    ModelSpec,
    canonical_model_ref,
    load_causal_lm,
    merge_if_peft,
    resolve_model_path,
)


def default_device() -> torch.device:
    """The device every model of these stages runs on: the GPU when there is one, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_frozen_lm(path: str, dtype: str):
    """The causal LM at `path` (a stage output or model id) in `dtype`, frozen, on `default_device()`.

    An adapter directory comes back folded into its base (`merge_and_unload`): the same function (to float
    rounding) without LoRA's two extra matmuls and PEFT's Python per wrapped layer at every decoding step —
    measured on the quickstart's r16 adapters on a 2-core CPU, greedy generation 1.2-1.6x and response log-probs
    1.3x faster, the same greedy tokens. The base is never quantized here (these stages load in `dtype`), so no
    re-quantization enters the fold.
    """
    model = load_causal_lm(ModelSpec(name_or_path=path, dtype=dtype), trainable=False)
    return merge_if_peft(model).to(default_device())


def release_memory() -> None:
    """Return a dropped model's memory now: the next model is loaded right after."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def progress_bar(console: Console) -> Progress:
    """A transient Rich progress bar on `console`: description, bar, done/total, elapsed time."""
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    )


def model_signature(path: str) -> dict[str, Any]:
    """What identifies a model's weights cheaply: its files' names, sizes and modification times."""
    resolved = Path(resolve_model_path(path))
    if not resolved.is_dir():
        return {"ref": canonical_model_ref(path)}
    files = sorted(p for p in resolved.iterdir() if p.is_file() and not p.name.startswith("."))
    return {"ref": str(resolved), "files": [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files]}
