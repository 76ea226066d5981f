"""`export`: a Lightning checkpoint of the SFT, reward or PPO stage -> the HF-format stage output that `fit` writes.

    python -m salsa_lightning export --checkpoint checkpoints/epoch=3.ckpt --output_dir outputs/sft-epoch3

A checkpoint is either one file (`torch.save`, single device / DDP) or, under `ModelParallelStrategy` (FSDP2), a
torch distributed checkpoint (DCP): a directory with one `__<rank>_0.distcp` shard file per rank, DCP's `.metadata`
index and Lightning's `meta.pt` (everything but the weights and optimizer states: epoch, step, hyper_parameters).
Both are read in ONE process with no process group, weights only (optimizer states stay on disk):

- the module is rebuilt from the checkpoint's hyper_parameters (LightningCLI stores the class path and the init
  arguments as plain data) with the stage's own `configure_model`, then its weights are loaded into it;
- the output is written by the stage's own `save_stage_output`, with the resolved config, seed and metrics that
  `cli.StageConfigCallback` put in the checkpoint.

Nothing is unpickled beyond tensors and plain data: `.ckpt` and `meta.pt` go through `torch.load(weights_only=True)`,
DCP reads its shards with `weights_only=True`, and DCP's `.metadata` (which DCP itself reads with a bare
`pickle.load`) goes through an unpickler that resolves only DCP's own metadata classes.
"""

from __future__ import annotations

import io
import pickle
import re
import textwrap
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from salsa_lightning.errors import SalsaError
from salsa_lightning.models.spec import DTYPE_NAMES
from salsa_lightning.stage import MANIFEST_NAME, check_output_dir

# Lightning's name for the non-tensor part of a distributed checkpoint (lightning.fabric.utilities.load)
LIGHTNING_META = "meta.pt"
DCP_METADATA = ".metadata"

PPO_CLASS = "salsa_lightning.modules.ppo.PPOModule"
STAGES = {
    "salsa_lightning.modules.sft.SFTModule": "sft",
    "salsa_lightning.modules.reward.RewardModule": "reward",
    PPO_CLASS: "ppo",
}
REWARD_STATS_NOTE = (
    "not computed: this reward model was exported from a checkpoint, and the training-set reward mean/std need the "
    "training data; PPO's `normalize_reward` needs them (re-run the reward stage to the end to get them)"
)


@dataclass
class ExportConfig:
    """Write the stage output of an SFT, reward or PPO checkpoint, as `fit` writes it at its end.

    The checkpoint is a `.ckpt` file, or the distributed-checkpoint directory that `ModelParallelStrategy` writes;
    the output is full weights or a PEFT adapter, tokenizer, config.yaml and salsa_manifest.json. Runs in one
    process, no GPU needed. A reward model exported this way has no training-set reward statistics (they need the
    training data), so PPO's `normalize_reward` refuses it.
    """

    checkpoint: str = ""
    """A checkpoint written by `python -m salsa_lightning fit` (ModelCheckpoint): `epoch=N.ckpt` as a file, or as a
    directory under `ModelParallelStrategy`. The base model it was trained from must still be at its path."""
    output_dir: str = ""
    """Where to write the stage output."""
    overwrite: bool = False
    """Replace `output_dir` if it exists (the old one is removed only after the new one is complete)."""


@dataclass
class LoadedCheckpoint:
    """What export needs from a checkpoint, before the weights are read."""

    path: Path
    distributed: bool
    meta: dict[str, Any]  # everything but state_dict / optimizer states
    state_dict: dict[str, torch.Tensor] | None  # a file's weights; None for DCP (read straight into the model)
    dtype: torch.dtype | None  # the dtype that holds most weight elements
    world_size: int | None  # the processes that wrote a distributed checkpoint; a file does not say


# ------------------------------------------------------------------ reading checkpoints safely


class _DCPMetadataUnpickler(pickle.Unpickler):
    """Resolves only what DCP's `.metadata` is made of: the dataclasses of `torch.distributed.checkpoint.metadata`,
    the filesystem's `_StorageInfo`, torch.Size, dtypes, layouts, paths. Anything else (a function a crafted file
    would call, a class with side effects) is refused before it is looked up."""

    def find_class(self, module: str, name: str) -> Any:
        if module == DCP_METADATA_MODULE:
            obj = super().find_class(module, name)
            if isinstance(obj, type) and obj.__module__ == module:  # plain dataclasses and one enum
                return obj
        if (module, name) in _SAFE_GLOBALS:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not part of a distributed-checkpoint index")


DCP_METADATA_MODULE = "torch.distributed.checkpoint.metadata"
_SAFE_GLOBALS = {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),  # a dataclass: file name, offset, length
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),  # looks a layout up by name
    ("collections", "OrderedDict"),
    ("pathlib", "PosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib", "PurePosixPath"),
    ("pathlib", "PureWindowsPath"),
}


def read_dcp_metadata(path: Path):
    """DCP's index of a distributed checkpoint (`torch.distributed.checkpoint.metadata.Metadata`), unpickled safely."""
    try:
        return _DCPMetadataUnpickler(io.BytesIO((path / DCP_METADATA).read_bytes())).load()
    except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, TypeError, ValueError) as err:
        raise SalsaError(
            f"The distributed checkpoint index {path / DCP_METADATA} cannot be read safely ({err}); "
            "export only reads checkpoints written by `salsa_lightning fit`."
        ) from err


def _safe_reader(path: Path):
    """DCP's FileSystemReader, with `.metadata` read by the restricted unpickler (DCP's own reader calls a bare
    `pickle.load`; its tensor reads already use `weights_only=True`). Only `read_metadata` is rewritten."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeFileSystemReader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any):
            metadata = read_dcp_metadata(path)
            if getattr(metadata, "storage_meta", None) is None:  # as FileSystemReader.read_metadata does
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeFileSystemReader(path)


def _torch_load(path: Path, what: str, **kwargs: Any) -> dict[str, Any]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, **kwargs)
    except Exception as err:  # torch raises UnpicklingError, RuntimeError or others for files it cannot read
        reason = _short(str(err).strip().splitlines()[0])
        raise SalsaError(
            f"{path} is not a {what} that loads without running code from it ({reason}); "
            "pass a checkpoint written by `python -m salsa_lightning fit`."
        ) from err
    if not isinstance(obj, dict):
        raise SalsaError(f"{path} holds a {type(obj).__name__}, not a Lightning checkpoint; pass a `.ckpt` from `fit`.")
    return obj


def _short(text: str, width: int = 240) -> str:
    return textwrap.shorten(text, width, placeholder=" ...")


def _key_summary(missing: list[str], unexpected: list[str]) -> str:
    parts = [f"{len(keys)} {what}, e.g. {keys[0]}" for what, keys in (("missing", missing), ("unexpected", unexpected))]
    return "; ".join(part for part, keys in zip(parts, (missing, unexpected)) if keys)


def _dominant_dtype(dtypes_and_sizes) -> torch.dtype | None:
    counts: Counter = Counter()
    for dtype, numel in dtypes_and_sizes:
        if dtype.is_floating_point:
            counts[dtype] += numel
    return counts.most_common(1)[0][0] if counts else None


def load_checkpoint(path: str | Path) -> LoadedCheckpoint:
    """Open a `.ckpt` file or a distributed-checkpoint directory; a `SalsaError` for anything else."""
    path = Path(path).expanduser()
    if not path.exists():
        raise SalsaError(
            f"The checkpoint {path} does not exist; pass a checkpoint that ModelCheckpoint wrote "
            "(e.g. lightning_logs/version_0/checkpoints/epoch=3.ckpt)."
        )
    if path.is_dir():
        if (path / MANIFEST_NAME).is_file():
            raise SalsaError(
                f"{path} is already a stage output (it has {MANIFEST_NAME}); `export` converts Lightning checkpoints."
            )
        if not ((path / DCP_METADATA).is_file() and (path / LIGHTNING_META).is_file()):
            raise SalsaError(
                f"The directory {path} is not a distributed checkpoint (it lacks {DCP_METADATA} and {LIGHTNING_META}); "
                "pass a `.ckpt` file or a checkpoint directory that ModelParallelStrategy wrote."
            )
        metadata = read_dcp_metadata(path)
        sizes = [
            (md.properties.dtype, md.size.numel())
            for key, md in metadata.state_dict_metadata.items()
            if key.startswith("state_dict.") and hasattr(md, "properties")
        ]
        meta = _torch_load(path / LIGHTNING_META, "Lightning checkpoint")
        # every rank writes its own __<rank>_<n>.distcp file
        ranks = {re.match(r"__(\d+)_", str(info.relative_path)) for info in (metadata.storage_data or {}).values()}
        world_size = len({m.group(1) for m in ranks if m}) or None
        return LoadedCheckpoint(path, True, meta, None, _dominant_dtype(sizes), world_size)
    ckpt = _torch_load(path, "Lightning checkpoint", mmap=True)
    state_dict = ckpt.pop("state_dict", None)
    ckpt.pop("optimizer_states", None)
    if not isinstance(state_dict, dict):
        raise SalsaError(f"{path} has no model weights (`state_dict`); pass a checkpoint that ModelCheckpoint wrote.")
    dtype = _dominant_dtype((t.dtype, t.numel()) for t in state_dict.values() if isinstance(t, torch.Tensor))
    return LoadedCheckpoint(path, False, ckpt, state_dict, dtype, None)


# ------------------------------------------------------------------ rebuilding the module


def stage_of(ckpt: LoadedCheckpoint) -> str:
    """`sft` or `reward`, from the class path LightningCLI stored in the hyper_parameters."""
    hparams = ckpt.meta.get("hyper_parameters") or {}
    class_path = hparams.get("_class_path")
    if class_path not in STAGES:
        raise SalsaError(
            f"{ckpt.path} was not written by the SFT, reward or PPO stage of `python -m salsa_lightning fit` "
            f"(its module is {class_path or 'not recorded'}); export converts only those checkpoints."
        )
    return STAGES[class_path]


def build_module(ckpt: LoadedCheckpoint):
    """The stage's LightningModule from the checkpoint's hyper_parameters, its model built by `configure_model`."""
    from lightning.pytorch.cli import instantiate_module

    from salsa_lightning.modules.ppo import PPOModule
    from salsa_lightning.modules.reward import RewardModule
    from salsa_lightning.modules.sft import SFTModule

    stage = stage_of(ckpt)
    cls = {"sft": SFTModule, "reward": RewardModule, "ppo": PPOModule}[stage]
    hparams = {k: v for k, v in ckpt.meta["hyper_parameters"].items() if k not in ("_class_path", "_instantiator")}
    # the training run's output_dir exists by now (and may hold `{seed}`): this module writes nowhere itself
    hparams.update(output_dir=None, overwrite=False)
    model = dict(hparams.get("model") or {})
    if model.get("dtype", "auto") == "auto" and ckpt.dtype in DTYPE_NAMES:
        # `auto` means bf16 on a CUDA GPU and float32 on a CPU: build in the dtype the weights were trained in
        model["dtype"] = DTYPE_NAMES[ckpt.dtype]
        hparams["model"] = model
    try:
        module = instantiate_module(cls, hparams)
    except Exception as err:
        from salsa_lightning.errors import user_error

        if user_error(err) is not None:  # e.g. the base model is gone: the stage's own sentence
            raise user_error(err) from err
        reason = _short(str(err))
        raise SalsaError(
            f"The hyper_parameters in {ckpt.path} do not fit {cls.__name__} of this salsa_lightning version "
            f"({reason}); export with the version that wrote the checkpoint."
        ) from err
    module.configure_model()
    module.eval()
    return stage, module


def load_weights(module, ckpt: LoadedCheckpoint) -> None:
    """Copy the checkpoint's weights into `module`; every weight of the module must be in the checkpoint."""
    try:
        if ckpt.distributed:
            import torch.distributed.checkpoint as dcp

            # DCP fills the tensors of the state dict it is given, in place: the module's own parameters. Only the
            # "state_dict" entries are requested, so the optimizer states are never read.
            with warnings.catch_warnings():  # "torch.distributed is ... uninitialized": one process is the intent
                warnings.filterwarnings("ignore", message="torch.distributed is disabled")
                dcp.load({"state_dict": module.state_dict()}, storage_reader=_safe_reader(ckpt.path), no_dist=True)
        else:
            result = module.load_state_dict(ckpt.state_dict, strict=False)
            if result.missing_keys or result.unexpected_keys:
                raise SalsaError(
                    f"The weights in {ckpt.path} do not fit the model its hyper_parameters describe "
                    f"({_key_summary(result.missing_keys, result.unexpected_keys)}); check that the base model it "
                    "was trained from is unchanged at its path."
                )
    except SalsaError:
        raise
    except Exception as err:  # DCP raises CheckpointException, load_state_dict RuntimeError
        reason = _short(str(err))
        raise SalsaError(
            f"The weights in {ckpt.path} do not fit the model its hyper_parameters describe ({reason}); check that "
            "the base model it was trained from is unchanged at its path."
        ) from err


# ------------------------------------------------------------------ the stage output


def exported_manifest(stage: str, module, ckpt: LoadedCheckpoint) -> dict[str, Any]:
    """The manifest the stage writes at the end of `fit` (its module's `stage_manifest`), from the checkpoint, plus
    where it came from."""
    from salsa_lightning.stage import CHECKPOINT_KEY

    extra = ckpt.meta.get(CHECKPOINT_KEY) or {}
    manifest = module.stage_manifest(extra.get("seed"), ckpt.meta.get("global_step"), extra.get("metrics") or {})
    manifest.update(
        # how the weights were trained (save_stage_output would describe this one process instead)
        training={"world_size": ckpt.world_size, "sharded": ckpt.distributed},
        exported_from={
            "checkpoint": str(ckpt.path.resolve()),
            "kind": "distributed" if ckpt.distributed else "file",
            "epoch": ckpt.meta.get("epoch"),
            "global_step": ckpt.meta.get("global_step"),
        },
    )
    if stage == "reward":
        import yaml

        data = (yaml.safe_load(extra.get("resolved_config") or "") or {}).get("data") or {}
        max_length = (data.get("init_args") or data).get("max_length")  # what scoring elsewhere truncates to
        manifest.update(reward_stats=None, reward_stats_note=REWARD_STATS_NOTE, data_counts={}, max_length=max_length)
    return manifest


def run_export(cfg: ExportConfig, quiet: bool = False) -> dict[str, Any]:
    """Write the stage output of `cfg.checkpoint` to `cfg.output_dir`; returns the manifest written there.

    Checks come first (output path, checkpoint format, stage), the output is built in a temporary directory and
    renamed into place when complete, so a failure leaves nothing behind."""
    from rich.console import Console

    from salsa_lightning.modules.common import save_stage_output
    from salsa_lightning.stage import CHECKPOINT_KEY

    if not cfg.checkpoint or not cfg.output_dir:
        raise SalsaError("`export` needs both --checkpoint PATH and --output_dir DIR.")
    out = check_output_dir(cfg.output_dir, cfg.overwrite)
    source = Path(cfg.checkpoint).expanduser().resolve()
    if out.resolve() == source or source in out.resolve().parents:
        raise SalsaError(f"The output directory {out} is the checkpoint or inside it; write the export elsewhere.")
    ckpt = load_checkpoint(cfg.checkpoint)
    stage, module = build_module(ckpt)
    load_weights(module, ckpt)
    manifest = exported_manifest(stage, module, ckpt)
    resolved_config = (ckpt.meta.get(CHECKPOINT_KEY) or {}).get("resolved_config") or _model_config(ckpt)
    if stage == "ppo":  # the policy out of its stack, with the run's history (and β) as the checkpoint has them
        module.on_load_checkpoint(ckpt.meta)
        manifest["kl_coef_final"] = module.kl_ctl.value
        module.resolved_config = resolved_config
        module.write_output(out, manifest, overwrite=cfg.overwrite)
    else:
        save_stage_output(out, module.model, module.tokenizer, manifest, resolved_config, cfg.overwrite)
    Console(quiet=quiet).print(
        f"Exported the {stage} checkpoint {ckpt.path} (global step {manifest['global_step']}) to {out}", highlight=False
    )
    return manifest


def _model_config(ckpt: LoadedCheckpoint) -> str:
    """config.yaml for a checkpoint written without `StageConfigCallback` (not through our CLI): the model part,
    which is all a checkpoint's hyper_parameters hold."""
    import yaml

    hparams = dict(ckpt.meta.get("hyper_parameters") or {})
    hparams.pop("_instantiator", None)
    model = {"class_path": hparams.pop("_class_path", None), "init_args": hparams}
    header = f"# The model settings of {ckpt.path} (its hyper_parameters); trainer and data settings were not saved.\n"
    return header + yaml.safe_dump({"model": model}, sort_keys=False)
