"""Reading rows from a Hub dataset or from local JSON / JSONL / Parquet files, through `datasets`."""

from __future__ import annotations

from pathlib import Path

from salsa_lightning.errors import SalsaError

_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}


def _local_files(path: Path) -> tuple[str, list[str]]:
    files = sorted(p for p in path.iterdir() if p.suffix in _BUILDERS) if path.is_dir() else [path]
    if not files:
        raise SalsaError(f"The data directory {path} holds no .json, .jsonl or .parquet file; point to the data files.")
    builders = {_BUILDERS.get(f.suffix) for f in files}
    if None in builders:
        raise SalsaError(f"The data file {files[0]} is not .json, .jsonl or .parquet; convert it to one of those.")
    if len(builders) > 1:
        raise SalsaError(f"The data directory {path} mixes JSON and Parquet files; keep one format per source.")
    return builders.pop(), [str(f) for f in files]


def load_rows(source: str, split: str = "train"):
    """A `datasets.Dataset` from a local file/directory or a Hub dataset name (then `split` picks the split).

    Local files have a single split; `split` is ignored for them.
    """
    import datasets

    path = Path(source).expanduser()
    if path.exists():
        builder, files = _local_files(path)
        try:
            return datasets.load_dataset(builder, data_files=files, split="train")
        except Exception as err:  # datasets raises many types for malformed files
            raise SalsaError(
                f"Could not read {source} as {builder} ({type(err).__name__}: {err}); fix the file."
            ) from err
    if source.startswith((".", "/", "~")) or path.suffix in _BUILDERS:
        raise SalsaError(
            f"The data file {source} does not exist; check the path (or generate it with `salsa_lightning data`)."
        )
    try:
        return datasets.load_dataset(source, split=split)
    except Exception as err:
        raise SalsaError(
            f"Could not load the Hub dataset '{source}' split '{split}' ({type(err).__name__}); check the name and "
            "split and your network, or pass local JSON/JSONL/Parquet files."
        ) from err
