"""What a soup input is: an SFT stage output (full weights or a PEFT LoRA adapter), found from its files."""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from salsa_lightning.errors import SalsaError
from salsa_lightning.stage import CONFIG_NAME, MANIFEST_NAME, read_manifest, sha256_file

FULL_SINGLE = "model.safetensors"
FULL_INDEX = "model.safetensors.index.json"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"

# Small text files that travel with the weights (tokenizer, HF config, chat template). Weights,
# indexes, our own manifest/config and training leftovers are written afresh or left behind.
_SIDE_SUFFIXES = {".json", ".txt", ".model", ".jinja", ".tiktoken"}
# soup_report.json: a soup of soups must not inherit its input's report
_NOT_SIDE = {FULL_INDEX, ADAPTER_CONFIG, MANIFEST_NAME, CONFIG_NAME, "trainer_state.json", "soup_report.json"}


@dataclass
class SoupInput:
    """One input directory and what was detected in it."""

    path: Path
    format: Literal["full", "lora"]
    weight_files: list[Path]
    """The safetensors files, in shard order (one file unless sharded)."""
    manifest: dict[str, Any] | None = None
    index: dict[str, Any] | None = None
    """The parsed `model.safetensors.index.json` of a sharded full-weight input."""
    adapter_config: dict[str, Any] | None = None
    hf_config: dict[str, Any] | None = field(default=None, repr=False)

    @property
    def base_model(self) -> str | None:
        """The base model the input was trained from, as its manifest or adapter config records it."""
        if self.manifest and self.manifest.get("base_model"):
            return str(self.manifest["base_model"])
        if self.adapter_config and self.adapter_config.get("base_model_name_or_path"):
            return str(self.adapter_config["base_model_name_or_path"])
        return None

    def digests(self) -> dict[str, Any]:
        """`{"path", "format", "sha256", "files": {name: sha256}}` for the manifest; `sha256` covers all weight files."""
        files = {f.name: sha256_file(f) for f in self.weight_files}
        if len(files) == 1:
            combined = next(iter(files.values()))
        else:  # sharded: one digest over "name:digest" lines, so that a changed shard changes it
            combined = hashlib.sha256("".join(f"{k}:{v}\n" for k, v in sorted(files.items())).encode()).hexdigest()
        out: dict[str, Any] = {"path": str(self.path), "format": self.format, "sha256": combined, "files": files}
        if self.manifest and "seed" in self.manifest:
            out["seed"] = self.manifest["seed"]
        return out


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise SalsaError(f"Cannot read {path} ({err}); re-create it by re-running the stage that wrote it.") from err


def describe_input(path: str | Path) -> SoupInput:
    """Detect the format of one soup input directory, or raise a `SalsaError` saying what is missing."""
    path = Path(path).expanduser()
    if not path.is_dir():
        raise SalsaError(f"The soup input {path} is not a directory; give the output directory of an SFT run.")
    path = path.resolve()  # manifests record absolute paths, so later stages can check them from any directory
    manifest = read_manifest(path)
    hf_config = _read_json(path / "config.json") if (path / "config.json").is_file() else None
    if (path / ADAPTER_CONFIG).is_file():
        weights = path / ADAPTER_WEIGHTS
        if not weights.is_file():
            raise SalsaError(
                f"The LoRA adapter {path} has no {ADAPTER_WEIGHTS}; save it with `save_pretrained(..., "
                "safe_serialization=True)`."
            )
        return SoupInput(path, "lora", [weights], manifest, adapter_config=_read_json(path / ADAPTER_CONFIG))
    if (path / FULL_INDEX).is_file():
        index = _read_json(path / FULL_INDEX)
        shards = sorted(set(index.get("weight_map", {}).values()))
        if not shards:
            raise SalsaError(f"The index {path / FULL_INDEX} lists no weights; re-save the model with save_pretrained.")
        missing = [s for s in shards if not (path / s).is_file()]
        if missing:
            raise SalsaError(f"The sharded model {path} lacks the shards {missing}; copy them there or re-save it.")
        return SoupInput(path, "full", [path / s for s in shards], manifest, index=index, hf_config=hf_config)
    if (path / FULL_SINGLE).is_file():
        return SoupInput(path, "full", [path / FULL_SINGLE], manifest, hf_config=hf_config)
    if any(path.glob("*.bin")):
        raise SalsaError(
            f"{path} holds PyTorch .bin weights only; re-save it with `save_pretrained(..., safe_serialization=True)`."
        )
    raise SalsaError(
        f"{path} holds neither full weights ({FULL_SINGLE}) nor a LoRA adapter ({ADAPTER_CONFIG}); "
        "give the output directory of an SFT run."
    )


def describe_inputs(paths: list[str], mode: str = "auto") -> tuple[list[SoupInput], Literal["full", "lora"]]:
    """All inputs, checked to share one format (and the requested `mode` unless it is `auto`)."""
    inputs = [describe_input(p) for p in paths]
    if not inputs:
        raise SalsaError("The soup got no inputs; list at least one SFT output directory under `inputs`.")
    formats = {i.format for i in inputs}
    if len(formats) > 1:
        kinds = ", ".join(f"{i.path} ({i.format})" for i in inputs)
        raise SalsaError(
            f"The inputs mix full-weight models and LoRA adapters ({kinds}); soup outputs of the same kind, "
            "or merge the adapters into full models first."
        )
    fmt = inputs[0].format
    if mode != "auto" and mode != fmt:
        raise SalsaError(f"`mode: {mode}` was asked for but the inputs are {fmt}; set `mode: auto` or `mode: {fmt}`.")
    return inputs, fmt


def copy_side_files(src: Path, dst: Path, replace: bool = True) -> list[str]:
    """Copy tokenizer/config files (not weights, not our manifest) from `src` to `dst`; returns their names.

    With `replace=False`, files already in `dst` are kept.
    """
    copied = []
    for f in sorted(src.iterdir()):
        if not replace and (dst / f.name).exists():
            continue
        if f.is_file() and f.suffix in _SIDE_SUFFIXES and f.name not in _NOT_SIDE:
            shutil.copy2(f, dst / f.name)
            copied.append(f.name)
    return copied
