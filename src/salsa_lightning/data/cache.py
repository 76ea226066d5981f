"""Tokenisation through `datasets.Dataset.map` and its on-disk cache: a second run over the same rows with the same
tokenizer, chat template, lengths, column names and tokenising code loads the tokens instead of recomputing them.

`datasets` would fingerprint a map by pickling the function and its arguments, tokenizer included. We give it the
fingerprint instead (`new_fingerprint=`), built from what changes the tokens, because its own hash of a function
defined in an installed module does not follow edits to the functions it calls (checked: the hash stays when a
helper changes), and a tokenizer pickle holds
state that does not change the tokens. The rows' own fingerprint (which `datasets` derives from the data files' paths
and modification times, the split and any `select`/`train_test_split`) is part of it.

Concurrent processes (the ranks of a distributed run) may tokenise the same rows at once: `datasets` writes each cache
file to a temporary file in the cache directory and renames it into place, so a reader sees a whole file or none,
never a half-written one; the ranks only repeat the work.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any


def _hash(value: Any) -> str:
    from datasets.fingerprint import Hasher

    return Hasher.hash(value)


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of what decides a tokenizer's ids: its vocabulary, merges, normalisation and added tokens (the fast
    tokenizer's serialised form, which a cache path or `name_or_path` alone does not pin), and its chat template."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        body = backend.to_str()
    else:  # a slow tokenizer: `datasets`' pickle-based hash of the whole object
        body = _hash(tokenizer)
    return _hash([type(tokenizer).__name__, getattr(tokenizer, "name_or_path", ""), body, tokenizer.chat_template])


def source_fingerprint(source: str) -> list[tuple[str, int, int]]:
    """(path, size, mtime) of each local data file behind `source` (none for a Hub name, whose revision is in the
    rows' fingerprint): a rewritten file gives a new cache entry even where the rows' fingerprint would not see it."""
    path = Path(source).expanduser()
    if not path.exists():
        return []
    files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
    return [(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files]


def code_fingerprint(*modules: ModuleType) -> str:
    """A hash of the source text of the modules that tokenise: an edit to any of them is a new cache entry (a comment
    too; re-tokenising once is cheaper than a stale cache)."""
    return _hash([inspect.getsource(m) for m in modules])


def cached_map(
    rows,
    encode: Callable[..., dict[str, list]],
    fn_kwargs: dict[str, Any],
    key: list[Any],
    *,
    name: str,
    num_proc: int = 1,
    cache_dir: str | None = None,
):
    """`rows.map(encode, batched, with_indices)` into the columns `encode` returns (the source columns are dropped),
    cached under a fingerprint of the rows and `key` (what else changes the output).

    The cache file lies in `cache_dir` (as `{name}-{fingerprint}.arrow`; with `num_proc` > 1, one file per process),
    or where `datasets` puts it when `cache_dir` is None: next to the rows' own Arrow files in the `datasets` cache
    (`HF_DATASETS_CACHE`). Rows held in memory and no `cache_dir` are tokenised without a cache."""
    fingerprint = _hash([rows._fingerprint, key])
    cache_file_name = None
    if cache_dir is not None:
        os.makedirs(os.path.expanduser(cache_dir), exist_ok=True)
        cache_file_name = os.path.join(os.path.expanduser(cache_dir), f"{name}-{fingerprint}.arrow")
    return rows.map(
        encode,
        batched=True,
        with_indices=True,
        fn_kwargs=fn_kwargs,
        remove_columns=rows.column_names,
        num_proc=num_proc if num_proc > 1 else None,
        new_fingerprint=fingerprint,
        cache_file_name=cache_file_name,
        desc=f"Tokenising {name}",
    )


def flags(encoded, column: str):
    """The bool column `column` of `encoded` as a numpy array, read as one Arrow column (iterating a `datasets`
    column goes row by row: about 45 s for 100k rows, against milliseconds here)."""
    import numpy as np

    if column not in encoded.column_names:  # no rows were mapped, so no columns were made
        return np.zeros(len(encoded), dtype=bool)
    return np.asarray(encoded.with_format("arrow")[column].to_numpy(zero_copy_only=False), dtype=bool)


def keep_flagged(encoded, flag: str = "keep"):
    """The rows of `encoded` whose `flag` column is true, without the flag columns (`keep`, `truncated`). The encoders
    mark the rows to drop rather than drop them, so that what was dropped can be counted from the columns in this
    process (a map returns no side values, runs in other processes with `num_proc`, and not at all on a cache hit)."""
    import numpy as np

    keep = flags(encoded, flag)
    if not keep.all():
        encoded = encoded.select(np.flatnonzero(keep))
    return encoded.remove_columns([c for c in (flag, "truncated") if c in encoded.column_names])
