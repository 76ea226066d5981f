"""`generation.merge_lora`: the policy adapter folded into the LoRA layout's shared base while `generate` runs (a merged
layer computes `(W + s·BA)x`, one matmul, instead of `Wx + s·B(Ax)`), and the base put back bit for bit afterwards,
because every other adapter (anchors, reward, value) reads W.

PEFT's `unmerge` subtracts the adapter again, which in floating point does not give W back exactly, so the base comes
back one of two ways (`generation.merge_restore`):
- `copy`: each targeted base weight is swapped for a copy, the merge writes into the copy, and afterwards the untouched
  original is swapped back (a pointer swap). Memory: one more copy of the targeted weights (for `all-linear`, nearly
  the whole decoder) while generation runs.
- `checkpoint`: the merge writes into the base weights themselves, and afterwards they are read back into place from
  the base checkpoint, cast as the load cast them. No copy; one read of the targeted weights per rollout (from the
  page cache once warm). When the stack is built every targeted weight is read once and compared bit for bit with
  the loaded one, so a checkpoint that does not hold exactly the loaded weights is refused there, not found later;
  a checkpoint file that changes during the run (rewritten, replaced) is refused before the next merge. The reads
  go into one reusable CPU buffer the size of the largest targeted tensor (`SafetensorsReader`): safetensors has
  no read into an existing tensor, and its memory map would leave every page it touched resident while the file
  stays open.
"""

from __future__ import annotations

import contextlib
import os
import weakref
from collections import Counter
from collections.abc import Iterator
from typing import Any, Literal

import torch
from torch import nn

from salsa_lightning.errors import SalsaError

MergeRestore = Literal["copy", "checkpoint"]
_INTS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two tensors hold the same dtype, shape and bytes (unlike `torch.equal`, -0.0 differs from 0.0 and a NaN
    equals itself)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    ints = _INTS[a.element_size()]
    return torch.equal(a.contiguous().view(ints), b.contiguous().view(ints))


def local_checkpoint_dir(base: str, revision: str | None = None) -> str | None:
    """The local directory a base model's weights were loaded from: an embedded model's cache, a local directory, or a
    Hub model's snapshot in the local Hub cache (nothing is downloaded); None when there is none."""
    from salsa_lightning.models.loading import resolve_model_path

    path = resolve_model_path(base)
    if os.path.isdir(path):
        return path
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(path, revision=revision, local_files_only=True)
    except Exception:  # not cached (or not a Hub id): the caller refuses in a sentence of its own
        return None


def checkpoint_key(param_name: str) -> str:
    """The name a PEFT-wrapped base parameter (`base_model.model.<...>.base_layer.weight`) has in the base checkpoint."""
    return ".".join(p for p in param_name.split(".") if p != "base_layer").removeprefix("base_model.model.")


def adapter_layers(model: nn.Module, adapter: str) -> list[tuple[str, Any]]:
    """(name, layer) of every PEFT LoRA layer of `model` that carries `adapter`."""
    from peft.tuners.lora import LoraLayer

    return [(name, layer) for name, layer in model.named_modules()
            if isinstance(layer, LoraLayer) and adapter in {*layer.lora_A, *layer.lora_embedding_A}]  # fmt: skip


class MergedAdapter:
    """Merge `adapter` of a PEFT `model` into its base for a block (`with merged():`) and put the base back after.

    `restore` is how (see the module docstring); `checkpoint` needs `base_path`, the base model the weights were
    loaded from (a directory, an `embedded:` name or a Hub id with its `revision`)."""

    def __init__(self, model: nn.Module, adapter: str, restore: MergeRestore = "copy", base_path: str | None = None,
                 revision: str | None = None):  # fmt: skip
        self.model, self.adapter, self.restore = model, adapter, restore
        self._refuse_tied_targets()
        # (layer, its base layer, the names of the base tensors the merge writes into), found once: the merge and
        # the read-back walk the same list
        self._layers: list[tuple[Any, nn.Module, list[str]]] = [
            (layer, layer.get_base_layer(), ["weight", *(["bias"] if layer.lora_bias.get(adapter) else [])])
            for _, layer in adapter_layers(model, adapter)
        ]
        self._readers: list[Any] = []
        # (base layer, tensor name, reader of its file, checkpoint key); the tensor is looked up at each use, as
        # moving the model to a device replaces it
        self._targets: list[tuple[nn.Module, str, Any, str]] = []
        self._stamps: list[tuple[int, int, int]] = []  # each file's (inode, size, mtime) when it was checked
        if restore == "checkpoint":
            self._open_checkpoint(base_path, revision)

    def _refuse_tied_targets(self) -> None:
        """A base weight tied to another module (an LM head targeted with tied embeddings) would carry the merge into
        that module too, which the unmerged adapter does not do."""
        uses = Counter(id(p) for _, p in self.model.named_parameters(remove_duplicate=False))
        for name, layer in adapter_layers(self.model, self.adapter):
            if uses[id(layer.get_base_layer().weight)] > 1:
                raise SalsaError(
                    f"`model.generation.merge_lora` cannot merge the policy adapter into {name}, whose base weight is "
                    "tied to another module; set merge_lora to false, or train the adapter without that module."
                )

    def _open_checkpoint(self, base_path: str | None, revision: str | None) -> None:
        from salsa_lightning.soup.inputs import describe_input
        from salsa_lightning.soup.streaming import SafetensorsReader

        def refuse(why: str) -> SalsaError:
            return SalsaError(f"`model.generation.merge_restore: checkpoint` cannot put the base back from {base_path}: "
                              f"{why}; use `merge_restore: copy`.")  # fmt: skip

        directory = local_checkpoint_dir(base_path, revision) if base_path is not None else None
        if directory is None:
            raise refuse("it is not a local directory, an embedded model or a Hub model in the local cache")
        try:
            files = describe_input(directory).weight_files
        except SalsaError as err:
            raise refuse(f"{directory} holds no full-weight safetensors checkpoint") from err
        if any(f.suffix != ".safetensors" for f in files):
            raise refuse(f"{directory} holds no full-weight safetensors checkpoint")
        self._readers = [SafetensorsReader(f) for f in files]
        weakref.finalize(self, _close, self._readers)  # the readers hold file descriptors, not memory
        self._stamps = self._file_stamps()
        where = {key: reader for reader in self._readers for key in reader.infos}
        names = {id(p): n for n, p in self.model.named_parameters(remove_duplicate=False)}
        for _, base, attrs in self._layers:
            for attr in attrs:
                tensor = getattr(base, attr)
                key = checkpoint_key(names[id(tensor)])
                reader = where.get(key)
                if reader is None or tuple(reader.infos[key].shape) != tuple(tensor.shape):
                    raise refuse(f"it holds no tensor {key} of shape {tuple(tensor.shape)}")
                self._targets.append((base, attr, reader, key))
        # on the CPU whatever device context the stack is built in (Lightning builds it under the root device's)
        nbytes = max((r.nbytes(k) for _, _, r, k in self._targets), default=0)
        self._buffer = torch.empty(nbytes, dtype=torch.uint8, device="cpu")
        for base, attr, reader, key in self._targets:  # once: the checkpoint holds exactly the loaded weights
            tensor = getattr(base, attr).data
            if not same_bits(reader.read(key, self._buffer).to(device=tensor.device, dtype=tensor.dtype), tensor):
                raise refuse(f"its {key} differs from the loaded weight (converted or changed on load)")

    def _file_stamps(self) -> list[tuple[int, int, int]]:
        return [(st.st_ino, st.st_size, st.st_mtime_ns) for st in (os.stat(r.path) for r in self._readers)]

    def _read_back(self) -> None:
        for base, attr, reader, key in self._targets:
            # copy_ casts as the load did (`Tensor.to`: the same rounding), checked bit for bit in `_open_checkpoint`
            getattr(base, attr).data.copy_(reader.read(key, self._buffer))

    @contextlib.contextmanager
    def __call__(self) -> Iterator[None]:
        if self.restore == "checkpoint" and self._file_stamps() != self._stamps:  # before anything is merged
            raise SalsaError(
                f"The base checkpoint {[str(r.path) for r in self._readers]} changed during the run, so the base "
                "cannot be read back after a merge; keep the base model's files unchanged while training, or use "
                "`model.generation.merge_restore: copy`."
            )
        swapped: list[tuple[nn.Module, dict[str, torch.Tensor]]] = []
        layers = []
        try:
            with torch.no_grad():
                for layer, base, attrs in self._layers:
                    if self.restore == "copy":
                        swapped.append((base, {n: getattr(base, n).data for n in attrs}))
                        for n in attrs:
                            getattr(base, n).data = getattr(base, n).data.clone()
                    layers.append(layer)
                    layer.merge(adapter_names=[self.adapter])  # in place: into the copy, or into the base itself
            yield
        finally:
            try:
                with torch.no_grad():
                    for base, originals in swapped:
                        for n, original in originals.items():
                            getattr(base, n).data = original
                    if self.restore == "checkpoint" and layers:
                        try:
                            self._read_back()
                        except Exception as err:  # an I/O error or an interrupt mid-read: W is partly merged
                            raise SalsaError(
                                f"Reading the base weights back after a merged generation failed ({err}); the base "
                                "is no longer the trained-from one, so this run cannot go on — restart it (from its "
                                "last checkpoint), or use `model.generation.merge_restore: copy`."
                            ) from err
            finally:
                for layer in layers:
                    if self.adapter in layer.merged_adapters:
                        layer.merged_adapters.remove(self.adapter)


def _close(readers: list[Any]) -> None:
    for reader in readers:
        reader.close()


__all__ = ["MergeRestore", "MergedAdapter", "adapter_layers", "checkpoint_key", "local_checkpoint_dir", "same_bits"]
