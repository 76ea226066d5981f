"""What `fit --ckpt_path` reads before Lightning does: the checkpoint checked (one sentence for a missing file, no
checkpoint, or a pickle that would run code), and the model it was written by, as the `--model` option that
rebuilds it, so that a resume starts from the checkpoint's hyper-parameters and the user's options override them."""

from __future__ import annotations

import json
from typing import Any

from salsa_lightning.errors import SalsaError


def check_ckpt_path(ckpt_path: str | None) -> None:
    """A `--ckpt_path` that is missing, no checkpoint, or a pickle that would run code: one sentence before any model
    is loaded (Lightning would fail after loading them, with a raw error). Lightning's named ones pass through."""
    if ckpt_path is None or str(ckpt_path) in ("last", "best", "hpc", "registry"):
        return
    from salsa_lightning.checkpoints import load_checkpoint

    try:
        load_checkpoint(ckpt_path)  # the safe reader `export` uses (weights_only, tensors memory-mapped)
    except SalsaError as err:
        raise SalsaError(f"--ckpt_path: {err}") from err


def checkpoint_model_arg(ckpt_path: str, given: Any) -> str | None:
    """`--model=<json>`: the class path and hyper-parameters of the model that wrote the checkpoint file, or None when
    it names no class. A `SalsaError` when `given` (the parsed `--model`, if the user gave one) is another class."""
    import torch

    hparams = torch.load(ckpt_path, weights_only=True, map_location="cpu").get("hyper_parameters") or {}
    class_path = hparams.get("_class_path")
    if class_path is None:
        return None
    if given is not None and given.get("class_path") != class_path:
        raise SalsaError(
            f"The checkpoint {ckpt_path} was written by {class_path}, but --model is {given.class_path}; resume "
            "it with the checkpoint's model, or start a new run without --ckpt_path."
        )
    saved = {"class_path": class_path, "init_args": {k: v for k, v in hparams.items() if not k.startswith("_")}}
    return f"--model={json.dumps(saved)}"
