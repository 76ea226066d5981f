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
        if builder == "json":
            for f in files:
                _check_utf8(f)
        try:
            return datasets.load_dataset(builder, data_files=files, split="train")
        except Exception as err:  # datasets raises many types for malformed files: name the file and line instead
            problem = next((p for p in map(_json_problem, files) if p), None) if builder == "json" else None
            raise SalsaError(
                problem or f"Could not read {source} as {builder} ({type(err).__name__}: {err}); fix the file."
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


def _check_utf8(file: str, chunk: int = 1 << 24) -> None:
    """Refuse a JSON file that is not UTF-8: pyarrow's reader would otherwise replace bad bytes without a word.
    Streamed through an incremental decoder (about a second per GB)."""
    import codecs

    decoder, offset, line = codecs.getincrementaldecoder("utf-8")(), 0, 1
    with open(file, "rb") as f:
        while block := f.read(chunk):
            try:
                decoder.decode(block)
            except UnicodeDecodeError as err:
                where = offset + err.start
                line += block[: err.start].count(b"\n")
                raise SalsaError(
                    f"The data file {file} is not UTF-8 (line {line}, byte {where}); save it as UTF-8."
                ) from None
            offset, line = offset + len(block), line + block.count(b"\n")
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            raise SalsaError(f"The data file {file} ends inside a UTF-8 character; save it as UTF-8.") from None


def _json_problem(file: str) -> str | None:
    """What is wrong with a JSON/JSONL file, as one sentence naming the file (and line), or None if nothing is found.
    Only run after `datasets` failed, so a good file is never read twice."""
    import json

    text = Path(file).read_text(encoding="utf-8")  # (checked to be UTF-8 already)
    if not text.strip():
        return f"The data file {file} is empty; put at least one row in it."
    if file.endswith(".jsonl") or not text.lstrip().startswith("["):
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                return f"Line {number} of {file} is not valid JSON ({err.msg}); fix or remove that line."
            if not isinstance(row, dict):
                return (
                    f'Line {number} of {file} is not a JSON object; each line must be one row like {{"prompt": ...}}.'
                )
        return None
    try:
        json.loads(text)
    except json.JSONDecodeError as err:
        return f"{file} is not valid JSON ({err.msg} at line {err.lineno}); fix the file."
    return None
