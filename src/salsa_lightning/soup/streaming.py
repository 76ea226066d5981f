"""Tensor-at-a-time safetensors I/O, so a soup of n models never holds more than a few tensors.

Headers are read and validated with `safetensors.safe_open`. Tensor data is then read with `os.preadv` straight
into one reusable buffer: `safe_open.get_tensor` returns a freshly allocated tensor each time, and on a
135M-parameter model the page faults of those allocations cost more than the reads themselves (about 5x
slower per tensor here); no safetensors API reads into a caller's buffer. Writing is hand-written too: the
`safetensors` library only serialises a complete in-memory dict (`save_file`), which would hold the whole
output model at once. The file format is small and fixed (an 8-byte little-endian header length, a JSON
header with each tensor's dtype, shape and byte range, then the raw bytes), so we write the header first
from the known shapes and then append each tensor as soon as it is computed.
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from salsa_lightning.errors import SalsaError

# safetensors dtype codes <-> torch dtypes (the codes of the format's header).
DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
CODES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}
FLOAT_CODES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives and what it looks like, read from a header only."""

    file: Path
    dtype: str  # safetensors code, e.g. "BF16"
    shape: tuple[int, ...]


@contextlib.contextmanager
def open_safetensors(path: str | Path) -> Iterator[safe_open]:
    """`safe_open` for torch, without mmap when the installed safetensors allows; errors become `SalsaError`."""
    path = Path(path)
    try:
        try:
            handle = safe_open(str(path), framework="pt", backend="pread")
        except TypeError:  # safetensors < 0.7 has no `backend`; mmap is then the only way
            handle = safe_open(str(path), framework="pt")
        with handle as f:
            yield f
    except (SafetensorError, OSError, ValueError) as err:
        raise SalsaError(
            f"Cannot read the safetensors file {path} ({err}); it is unreadable, truncated or not safetensors — "
            "re-create it (e.g. re-run the stage that wrote it)."
        ) from err


def read_header(path: str | Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """The tensors of one file (in file order) and its `__metadata__`, without reading any tensor data."""
    path = Path(path)
    with open_safetensors(path) as f:
        infos = {}
        for name in f.offset_keys():
            sl = f.get_slice(name)
            infos[name] = TensorInfo(path, sl.get_dtype(), tuple(sl.get_shape()))
        return infos, dict(f.metadata() or {})


class SafetensorsReader:
    """Random access to the tensors of one (already validated) safetensors file, read into a caller's buffer."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.infos, self.metadata = read_header(self.path)  # validates the file (size, offsets, JSON) first
        self._fd = os.open(self.path, os.O_RDONLY)
        (n,) = struct.unpack("<Q", os.pread(self._fd, 8, 0))
        header = json.loads(os.pread(self._fd, n, 8))
        self._data_start = 8 + n
        self._offsets = {k: tuple(v["data_offsets"]) for k, v in header.items() if k != "__metadata__"}

    def nbytes(self, name: str) -> int:
        start, end = self._offsets[name]
        return end - start

    def read(self, name: str, buf: torch.Tensor | None = None) -> torch.Tensor:
        """Tensor `name`, read into the front of `buf` (flat uint8, large enough) or into a new tensor.

        The result is a view of `buf`: valid until the next read into it.
        """
        info = self.infos[name]
        start, end = self._offsets[name]
        size = end - start
        if buf is None:
            buf = torch.empty(size, dtype=torch.uint8)
        dst = memoryview(buf[:size].numpy())
        pos = 0
        while pos < size:  # preadv may return short counts on large reads
            got = os.preadv(self._fd, [dst[pos:]], self._data_start + start + pos)
            if got <= 0:
                raise SalsaError(f"The safetensors file {self.path} ended early; it is truncated — re-create it.")
            pos += got
        # (nbytes,) uint8 -> (numel,) dtype -> the tensor's shape
        return buf[:size].view(DTYPES[info.dtype]).view(info.shape)

    def close(self) -> None:
        os.close(self._fd)


class StreamingSafetensorsWriter:
    """Write a safetensors file whose tensors arrive one at a time, in the order given up front."""

    def __init__(self, path: str | Path, specs: Sequence[tuple[str, str, Sequence[int]]], metadata: dict[str, str]):
        if sys.byteorder != "little":  # the format is little-endian and we write raw tensor bytes
            raise SalsaError("Streaming safetensors output needs a little-endian machine.")
        self.path = Path(path)
        self._order = [name for name, _, _ in specs]
        self._expect: dict[str, tuple[str, tuple[int, ...]]] = {}
        header: dict[str, object] = {"__metadata__": dict(metadata)}
        offset = 0
        for name, code, shape in specs:
            shape = tuple(int(s) for s in shape)
            numel = 1
            for s in shape:
                numel *= s
            nbytes = numel * torch.empty((), dtype=DTYPES[code]).element_size()
            header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            self._expect[name] = (code, shape)
            offset += nbytes
        self.data_size = offset
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the reference writer pads the header to 8 bytes; keeps data aligned
        self._file = open(self.path, "wb")  # noqa: SIM115 -- closed in close()
        self._file.write(struct.pack("<Q", len(raw)))
        self._file.write(raw)
        self._next = 0

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Append `tensor`; it must be the next one in the declared order, with the declared dtype and shape."""
        expected = self._order[self._next] if self._next < len(self._order) else None
        if name != expected:
            raise RuntimeError(f"streaming writer: got tensor {name!r}, expected {expected!r}")
        code, shape = self._expect[name]
        if CODES.get(tensor.dtype) != code or tuple(tensor.shape) != shape:
            raise RuntimeError(
                f"streaming writer: {name} is {tensor.dtype}{tuple(tensor.shape)}, declared {code}{shape}"
            )
        # (numel,) bytes view of the tensor; `reshape(-1)` also covers 0-dim tensors, which `view` cannot retype
        flat = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
        self._file.write(memoryview(flat.numpy()))
        self._next += 1

    def close(self) -> None:
        self._file.close()
        if self._next != len(self._order):
            raise RuntimeError(f"streaming writer: {len(self._order) - self._next} tensors were never written")

    def __enter__(self) -> StreamingSafetensorsWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self._file.close()
