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
    """Fail early (before any work) if `path` cannot become this stage's output directory: it exists and `overwrite`
    is off, it is a file, or the directory it would be made in is not a writable directory."""
    path = Path(path)
    if path.is_file() or (path.exists() and not path.is_dir()):
        raise SalsaError(f"The output path {path} is a file, not a directory; choose a directory path for the output.")
    if path.exists() and not overwrite:
        raise SalsaError(
            f"The output directory {path} already exists; choose another path or set `overwrite: true` to replace it."
        )
    parent = path.absolute().parent
    while not parent.exists():  # missing parents are made; the nearest existing one must take new entries
        parent = parent.parent
    if not parent.is_dir():
        raise SalsaError(
            f"The output path {path} lies under {parent}, which is a file; choose a path under a directory."
        )
    if not _writable(parent):
        raise SalsaError(f"Cannot write the output {path}: {parent} is not writable; choose a writable location.")
    return path


def _writable(directory: Path) -> bool:
    """Whether a new entry can be made in `directory` (tried, since permissions alone miss read-only mounts and root)."""
    if not os.access(directory, os.W_OK | os.X_OK):
        return False
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".salsa-probe-", dir=directory))
    except OSError:
        return False
    return True


def _remove_dead_temp_dirs(path: Path) -> None:
    """Remove the temporary directories an earlier run of this stage left beside `path` when it was killed (their
    names carry the writer's pid; a directory whose process still runs is left alone)."""
    for entry in path.parent.glob(f".{path.name}.tmp-*-*"):
        pid = entry.name[len(f".{path.name}.tmp-") :].split("-", 1)[0]
        if entry.is_dir() and pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(entry, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_output_dir(path: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory next to `path`; on success rename it to `path`, on error delete it.

    The directory gets the permissions any `mkdir` would (the umask's), not `mkdtemp`'s private 0700, so teammates
    and serving processes can read the output. Dead temporary directories of killed runs are removed first.

    >>> with atomic_output_dir("out/soup") as tmp:   # doctest: +SKIP
    ...     (tmp / "model.safetensors").write_bytes(...)
    """
    path = check_output_dir(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_dead_temp_dirs(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-{os.getpid()}-", dir=path.parent))
    os.chmod(tmp, 0o777 & ~_umask())
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
