"""Bad input: one clear sentence naming the problem and the fix, exit status 2, no output left behind."""

from __future__ import annotations

import pytest
from helpers import addition_conversations, sft_args, write_jsonl

from salsa_lightning.cli import main


def run_fails(args: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "error:" in err and "Traceback" not in err
    return " ".join(err.split())


@pytest.fixture()
def good_data(tmp_path):
    return write_jsonl(tmp_path / "sft.jsonl", addition_conversations(16))


def test_missing_data_file(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    msg = run_fails(sft_args(str(tiny_model_dir), str(tmp_path / "nope.jsonl"), str(out)), capsys)
    assert "nope.jsonl does not exist" in msg
    assert not out.exists()


def test_row_without_messages(tiny_model_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "bad.jsonl", [*addition_conversations(4), {"text": "no messages here"}])
    out = tmp_path / "out"
    msg = run_fails(sft_args(str(tiny_model_dir), str(data), str(out), "--data.val_fraction=0.5"), capsys)
    assert "has no `messages`" in msg
    assert not out.exists()


def test_empty_dataset(tiny_model_dir, tmp_path, capsys):
    data = tmp_path / "empty.jsonl"
    data.write_text("")
    out = tmp_path / "out"
    msg = run_fails(sft_args(str(tiny_model_dir), str(data), str(out)), capsys)
    assert "empty.jsonl" in msg
    assert not out.exists()


def test_unknown_model_without_network(good_data, tmp_path, capsys):
    out = tmp_path / "out"
    msg = run_fails(sft_args("no-such-org/no-such-model", str(good_data), str(out)), capsys)
    assert "Could not load model 'no-such-org/no-such-model'" in msg and "local path" in msg
    assert not out.exists()


def test_missing_local_model_dir(good_data, tmp_path, capsys):
    msg = run_fails(sft_args(str(tmp_path / "missing-model"), str(good_data), None), capsys)
    assert "missing-model does not exist" in msg


def test_existing_output_dir_is_refused_before_training(tiny_model_dir, good_data, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("previous run")
    msg = run_fails(sft_args(str(tiny_model_dir), str(good_data), str(out)), capsys)
    assert "already exists" in msg and "overwrite: true" in msg
    assert (out / "keep.txt").read_text() == "previous run"


def test_overwrite_replaces_output_dir(tiny_model_dir, good_data, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("previous run")
    main(sft_args(str(tiny_model_dir), str(good_data), str(out), "--model.overwrite=true", "--trainer.max_steps=1"))
    assert (out / "salsa_manifest.json").is_file() and not (out / "keep.txt").exists()


def test_crash_during_write_leaves_nothing(tmp_path):
    from salsa_lightning.stage import atomic_output_dir

    out = tmp_path / "stage"
    with pytest.raises(RuntimeError):
        with atomic_output_dir(out) as tmp:
            (tmp / "half.bin").write_bytes(b"x")
            raise RuntimeError("disk full")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("kind,match", [("missing", "does not exist"), ("not a checkpoint", "loads without running code"),
                                        ("code", "loads without running code")])  # fmt: skip
def test_bad_ckpt_path_is_one_sentence_before_any_work(tiny_model_dir, tmp_path, good_data, capsys, kind, match):
    import pickle

    ckpt = tmp_path / "resume.ckpt"
    if kind == "not a checkpoint":
        ckpt.write_bytes(b"these bytes are no checkpoint")
    elif kind == "code":

        class RunsCode:
            def __reduce__(self):
                return (print, ("CODE RAN",))

        ckpt.write_bytes(pickle.dumps({"state_dict": {}, "x": RunsCode()}))
    out = tmp_path / "sft"
    msg = run_fails(sft_args(str(tiny_model_dir), str(good_data), str(out), f"--ckpt_path={ckpt}"), capsys)
    assert msg.startswith("error: --ckpt_path:") and match in msg, msg
    assert "CODE RAN" not in capsys.readouterr().out and not out.exists()


@pytest.mark.parametrize(
    "args,expected",
    [
        (["fit", "--model=SFTModule", "--model.no_such=1"], "`--model.no_such` is not an option of SFTModule"),
        (["fit", "--model=SFTModule", "--model.optim.lr=abc"], "`--model.optim.lr` accepts float, not 'abc'"),
        (["fit", "--model=SFTModule", "--model.optim.nope=1"], "`--model.optim.nope` is not an option of OptimSpec"),
        (
            ["fit", "--model=SFTModule", "--trainer.max_epochs=abc"],
            "`--trainer.max_epochs` accepts int or null, not 'abc'",
        ),
        (["soup", "--weights=abc"], "`--weights` accepts list[float] or null, not 'abc'"),
        (["soup", "--mode=half"], "`--mode` accepts one of 'auto', 'full', 'lora', not 'half'"),
        (["soup", "--report.judges=[gold, llm]"], "`--report.judges` accepts one of 'gold', 'reward', not 'llm'"),
    ],
)
def test_a_bad_option_is_one_line_naming_it_not_the_usage_text(args, expected, capsys):
    msg = run_fails(args, capsys)
    err = capsys.readouterr().err  # (already consumed by run_fails: re-run to see the raw lines)
    with pytest.raises(SystemExit):
        main(args)
    raw = capsys.readouterr().err
    assert expected in msg and "--help` lists every option" in msg
    assert raw.count("\n") == 1 and "usage:" not in raw and "NestedArg" not in raw and not err
