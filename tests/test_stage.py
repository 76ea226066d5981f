"""Stage outputs: refused before any work when they cannot be written, readable as any `mkdir`'s, and dead
temporary directories of killed runs cleaned up (never a live one)."""

from __future__ import annotations

import os
import stat
import subprocess
import sys

import pytest

from salsa_lightning import stage
from salsa_lightning.errors import SalsaError
from salsa_lightning.stage import atomic_output_dir, check_output_dir


def test_a_file_where_the_output_directory_goes_is_called_a_file(tmp_path):
    (tmp_path / "out").write_text("x")
    with pytest.raises(SalsaError, match="is a file, not a directory"):
        check_output_dir(tmp_path / "out", overwrite=True)


def test_an_output_under_a_file_is_refused(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(SalsaError, match="which is a file"):
        check_output_dir(tmp_path / "f" / "sub" / "out", overwrite=False)


def test_missing_parents_are_fine_when_the_nearest_existing_one_is_writable(tmp_path):
    assert check_output_dir(tmp_path / "a" / "b" / "out", overwrite=False) == tmp_path / "a" / "b" / "out"
    assert not (tmp_path / "a").exists()  # the check makes nothing


def test_an_unwritable_parent_is_refused_before_any_work(tmp_path, monkeypatch):
    # (the tests run as root, for whom permission bits do not bind: simulate the refusal the OS would give)
    real = stage.tempfile.mkdtemp

    def refuse(*args, dir=None, **kwargs):
        if dir is not None and os.path.samefile(dir, tmp_path):
            raise PermissionError(13, "Permission denied")
        return real(*args, dir=dir, **kwargs)

    monkeypatch.setattr(stage.tempfile, "mkdtemp", refuse)
    with pytest.raises(SalsaError, match="is not writable"):
        check_output_dir(tmp_path / "out", overwrite=False)
    assert list(tmp_path.iterdir()) == []


def test_outputs_honour_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        with atomic_output_dir(tmp_path / "out") as tmp:
            (tmp / "w").write_text("x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o755


def test_dead_temp_dirs_are_removed_and_live_ones_kept(tmp_path):
    dead_pid = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True, check=True).stdout.strip()  # fmt: skip
    dead = tmp_path / f".out.tmp-{dead_pid}-abc"
    live = tmp_path / f".out.tmp-{os.getpid()}-xyz"
    other_stage = tmp_path / f".other.tmp-{dead_pid}-abc"
    for d in (dead, live, other_stage):
        d.mkdir()
        (d / "weights").write_text("partial")
    with atomic_output_dir(tmp_path / "out") as tmp:
        (tmp / "w").write_text("x")
    assert not dead.exists() and live.exists() and other_stage.exists()
    assert (tmp_path / "out" / "w").read_text() == "x"


# ---------------------------------------------------------------- data files: one sentence naming file and line
@pytest.mark.parametrize(
    "content,match",
    [
        (b"", r"is empty"),
        (b"  \n\n", r"is empty"),
        (b'{"prompt": "a"}\n{"prompt": \n', r"Line 2 of .* is not valid JSON"),
        (b'{"prompt": "a"}\n[1, 2]\n', r"Line 2 of .* is not a JSON object"),
        (b'{"prompt": "a"}\n{"prompt": "a\xff"}\n', r"is not UTF-8 \(line 2, byte 29\)"),
        (b'{"prompt": "\xc3', r"ends inside a UTF-8 character"),
    ],
)
def test_bad_data_files_are_one_sentence(tmp_path, content, match):
    from salsa_lightning.data.sources import load_rows

    f = tmp_path / "rows.jsonl"
    f.write_bytes(content)
    with pytest.raises(SalsaError, match=match):
        load_rows(str(f))


def test_good_utf8_data_reads_as_written(tmp_path):
    from salsa_lightning.data.sources import load_rows

    f = tmp_path / "rows.jsonl"
    f.write_text('{"prompt": "é — ✓"}\n', encoding="utf-8")
    assert load_rows(str(f))[0]["prompt"] == "é — ✓"


# ---------------------------------------------------------------- broken model directories
@pytest.mark.parametrize("case,match", [("truncated", "truncated or not safetensors"),
                                        ("garbage", "truncated or not safetensors"),
                                        ("remote code", "trust_remote_code: true")])  # fmt: skip
def test_a_broken_model_directory_is_one_sentence(tmp_path, tiny_model_dir, case, match):
    import json
    import shutil

    from salsa_lightning.models.loading import load_causal_lm

    d = tmp_path / "model"
    shutil.copytree(tiny_model_dir, d)
    weights = d / "model.safetensors"
    if case == "truncated":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif case == "garbage":
        weights.write_bytes(b"not a safetensors file" * 10)
    else:
        config = json.loads((d / "config.json").read_text())
        config.update(model_type="custom-arch", auto_map={"AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"})
        (d / "config.json").write_text(json.dumps(config))
    with pytest.raises(SalsaError, match=match):
        load_causal_lm(str(d))
