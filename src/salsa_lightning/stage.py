"""Stage output directories: written whole or not at all.

Every stage writes a self-describing directory the next stage takes as a path: HF-format weights
(or a PEFT adapter), the tokenizer, the resolved config (`config.yaml`) and a small JSON manifest
(`salsa_manifest.json`). Outputs are built in a temporary sibling directory and renamed into place,
so a crash or a bad input never leaves a half-written output behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from salsa_lightning.errors import SalsaError

MANIFEST_NAME = "salsa_manifest.json"
CONFIG_NAME = "config.yaml"
# The key under which the CLI stores the resolved config, seed and metrics in every checkpoint (`export` reads it).
CHECKPOINT_KEY = "salsa_lightning"


def check_output_dir(path: str | Path, overwrite: bool) -> Path:
    """Fail early (before any work) if `path` exists and `overwrite` is off."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise SalsaError(
            f"The output directory {path} already exists; choose another path or set `overwrite: true` to replace it."
        )
    return path


@contextlib.contextmanager
def atomic_output_dir(path: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory next to `path`; on success rename it to `path`, on error delete it.

    >>> with atomic_output_dir("out/soup") as tmp:   # doctest: +SKIP
    ...     (tmp / "model.safetensors").write_bytes(...)
    """
    path = check_output_dir(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if path.exists():  # overwrite: move the old one aside first so the swap is quick and recoverable
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, path)


def write_manifest(directory: str | Path, manifest: dict[str, Any]) -> Path:
    """Write `salsa_manifest.json` (sorted keys, so equal manifests are equal files)."""
    out = Path(directory) / MANIFEST_NAME
    out.write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str) + "\n")
    return out


def read_manifest(directory: str | Path) -> dict[str, Any] | None:
    """The manifest of a stage output, or None if `directory` is not one."""
    f = Path(directory) / MANIFEST_NAME
    if not f.is_file():
        return None
    try:
        return json.loads(f.read_text())
    except json.JSONDecodeError as err:
        raise SalsaError(f"The manifest {f} is not valid JSON ({err}); re-run the stage that wrote it.") from err


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    """Hex sha256 of a file, read in 4 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
