"""Checkpoints: a sharded (distributed) FSDP2 checkpoint resumes exactly, and `export` turns a checkpoint (sharded
directory or `.ckpt` file) into the stage output that `fit` writes at its end.

The two 2-process launches (CPU, gloo) are shared by the module: one uninterrupted 4-epoch run that checkpoints every
epoch, and one run resumed from its epoch-2 checkpoint. Every other test here runs in this process."""

from __future__ import annotations

import json
import pickle
import time
from pathlib import Path

import pytest
import torch
import yaml
from helpers import addition_conversations, addition_preferences, reward_args, sft_args, write_jsonl
from safetensors.torch import load_file
from test_fsdp import STRATEGY, common_args, equal_length_conversations, torchrun

from salsa_lightning.checkpoints import read_dcp_metadata
from salsa_lightning.cli import cli_main, main
from salsa_lightning.errors import SalsaError
from salsa_lightning.stage import MANIFEST_NAME

# what differs between two writes of the same model: when, and where the export came from
VOLATILE_MANIFEST_KEYS = {"created", "exported_from"}
SFT_CLASS = "salsa_lightning.modules.sft.SFTModule"


@pytest.fixture(scope="module")
def sharded_runs(tiny_model_dir, tmp_path_factory) -> Path:
    """`whole/`: 4 epochs on 2 processes, a sharded checkpoint after every epoch; `resumed/`: the same config resumed
    from whole's epoch-2 checkpoint. Each has `out/` (the stage output), `ckpt/epoch=N.ckpt` and per-rank losses."""
    tmp = tmp_path_factory.mktemp("sharded")
    data = write_jsonl(tmp / "sft.jsonl", equal_length_conversations())

    def run(name: str, *extra: str) -> None:
        args = common_args(str(tiny_model_dir), str(data), str(tmp / name / "out"), str(tmp / name / "loss"))
        args += ["--data.batch_size=4", "--trainer.devices=2", STRATEGY, "--trainer.enable_checkpointing=true",
                 "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
                 f"--trainer.callbacks.dirpath={tmp / name / 'ckpt'}", "--trainer.callbacks.filename={epoch}",
                 "--trainer.callbacks.save_top_k=-1", *extra]  # fmt: skip
        start = time.perf_counter()
        torchrun(args, tmp)
        print(f"{name}: {time.perf_counter() - start:.1f} s")

    run("whole")
    run("resumed", f"--ckpt_path={tmp / 'whole' / 'ckpt' / 'epoch=1.ckpt'}")  # epochs count from 0
    return tmp


def losses(run_dir: Path) -> list[list[float]]:
    return [json.loads((run_dir / f"loss.rank{r}.json").read_text()) for r in (0, 1)]


def assert_equal_weights(a: Path, b: Path, exact: bool = True) -> None:
    x, y = load_file(str(a)), load_file(str(b))
    assert x.keys() == y.keys()
    for k in x:
        if exact:
            assert torch.equal(x[k], y[k]), k
        else:
            torch.testing.assert_close(x[k], y[k], rtol=1e-6, atol=1e-7, msg=k)


@pytest.mark.distributed
def test_sharded_checkpoint_resumes_like_an_uninterrupted_run(sharded_runs):
    ckpt = sharded_runs / "whole" / "ckpt" / "epoch=1.ckpt"
    # a distributed checkpoint: one shard file per rank, DCP's index, Lightning's metadata; not one file
    assert ckpt.is_dir()
    assert sorted(p.name for p in ckpt.iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp", "meta.pt"]
    index = read_dcp_metadata(ckpt).state_dict_metadata
    assert any(k.startswith("optimizer_0.state.") and k.endswith(".exp_avg_sq") for k in index)  # AdamW moments

    whole, resumed = losses(sharded_runs / "whole"), losses(sharded_runs / "resumed")
    assert [len(r) for r in whole] == [4, 4] and [len(r) for r in resumed] == [2, 2]
    # Epoch 3's loss comes before any resumed update (it checks the weights); epoch 4's loss and the final weights
    # come after AdamW steps, so they agree only if the moments, the step count and the learning-rate schedule were
    # restored too. Tolerance: 1e-6 relative (here they are bit-equal: same processes, same reduction order,
    # float32). A fresh AdamW and schedule at the same point moves the epoch-4 loss by 1.3e-2 relative and the
    # weights by 1e-2 (measured in one process), four orders of magnitude outside it.
    for whole_rank, resumed_rank in zip(whole, resumed, strict=True):
        assert resumed_rank == pytest.approx(whole_rank[2:], rel=1e-6, abs=0)
    assert whole[0][-1] < whole[0][0]  # it trained, so the agreement is not the trivial one
    outputs = [sharded_runs / run / "out" / "model.safetensors" for run in ("whole", "resumed")]
    assert_equal_weights(*outputs, exact=False)


@pytest.mark.distributed
def test_export_of_a_sharded_checkpoint_equals_the_fit_end_output(sharded_runs, tmp_path):
    fit_out, out = sharded_runs / "resumed" / "out", tmp_path / "exported"
    cli_main(["export", f"--checkpoint={sharded_runs / 'resumed' / 'ckpt' / 'epoch=3.ckpt'}", f"--output_dir={out}"])

    assert_equal_weights(fit_out / "model.safetensors", out / "model.safetensors")
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in fit_out.iterdir())
    for f in fit_out.iterdir():  # tokenizer, HF config, and the run's resolved config.yaml
        if f.name not in {MANIFEST_NAME, "model.safetensors"}:
            assert f.read_bytes() == (out / f.name).read_bytes(), f.name
    fit_manifest = json.loads((fit_out / MANIFEST_NAME).read_text())
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    for key in fit_manifest.keys() - VOLATILE_MANIFEST_KEYS:
        assert manifest[key] == fit_manifest[key], key
    assert manifest["exported_from"]["kind"] == "distributed" and manifest["global_step"] == 4
    assert manifest["exported_from"]["checkpoint"].endswith("epoch=3.ckpt")
    assert not list(tmp_path.glob(".*tmp*"))


# ---------------------------------------------------------------- single-process checkpoints (.ckpt files)


@pytest.fixture(scope="module")
def lora_run(tiny_model_dir, tmp_path_factory):
    """A tiny LoRA SFT run that writes an ordinary `.ckpt` (default ModelCheckpoint) and its stage output."""
    tmp = tmp_path_factory.mktemp("lora")
    data = write_jsonl(tmp / "sft.jsonl", addition_conversations(16))
    cli = cli_main(sft_args(str(tiny_model_dir), str(data), str(tmp / "out"), "--trainer.max_epochs=2",
                            "--model.optim.lr=1e-2", "--model.model.lora.r=4", "--model.model.lora.alpha=8",
                            "--trainer.enable_checkpointing=true", f"--trainer.default_root_dir={tmp}"))  # fmt: skip
    (ckpt,) = (tmp / "checkpoints").glob("*.ckpt")
    assert ckpt.is_file()
    return cli, ckpt, tmp / "out"


def peft_logits(base_dir: Path, adapter_dir: Path, ids: torch.Tensor) -> torch.Tensor:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter_dir).eval()
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits


def test_lora_ckpt_exports_an_adapter_that_plain_peft_loads(lora_run, tiny_model_dir, tmp_path):
    cli, ckpt, fit_out = lora_run
    out = tmp_path / "exported"
    cli_main(["export", f"--checkpoint={ckpt}", f"--output_dir={out}"])

    assert (out / "adapter_config.json").is_file() and not (out / "model.safetensors").exists()
    assert_equal_weights(fit_out / "adapter_model.safetensors", out / "adapter_model.safetensors")
    adapter = load_file(out / "adapter_model.safetensors")
    assert any(k.endswith("lora_B.weight") and v.abs().sum() > 0 for k, v in adapter.items())  # it trained
    ids = torch.randint(3, 300, (2, 12))
    theirs = peft_logits(tiny_model_dir, out, ids)
    assert torch.equal(theirs, peft_logits(tiny_model_dir, fit_out, ids))
    trained = cli.model.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(trained(input_ids=ids, attention_mask=torch.ones_like(ids)).logits, theirs)

    manifest = json.loads((out / MANIFEST_NAME).read_text())
    fit_manifest = json.loads((fit_out / MANIFEST_NAME).read_text())
    assert manifest["format"] == "lora" and manifest["seed"] == 1 and manifest["exported_from"]["kind"] == "file"
    for key in ("global_step", "base_model", "metrics"):
        assert manifest[key] == fit_manifest[key], key
    assert (out / "config.yaml").read_text() == (fit_out / "config.yaml").read_text()

    # --overwrite (a bare flag) replaces the export
    (out / "stale.txt").write_text("x")
    cli_main(["export", f"--checkpoint={ckpt}", f"--output_dir={out}", "--overwrite"])
    assert not (out / "stale.txt").exists() and (out / "adapter_model.safetensors").is_file()


def test_checkpoint_written_outside_our_cli_exports_its_model_settings(lora_run, tmp_path):
    # a checkpoint without what StageConfigCallback adds: config.yaml holds what it has, the model's settings
    from salsa_lightning.stage import CHECKPOINT_KEY

    _, ckpt, fit_out = lora_run
    bare = torch.load(ckpt, weights_only=True)
    del bare[CHECKPOINT_KEY]
    torch.save(bare, tmp_path / "bare.ckpt")
    out = tmp_path / "exported"
    cli_main(["export", f"--checkpoint={tmp_path / 'bare.ckpt'}", f"--output_dir={out}"])

    assert_equal_weights(fit_out / "adapter_model.safetensors", out / "adapter_model.safetensors")
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["model"]["class_path"] == "salsa_lightning.modules.sft.SFTModule"
    assert config["model"]["init_args"]["model"]["lora"]["r"] == 4
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert manifest["seed"] is None and manifest["metrics"] == {}


def test_reward_ckpt_exports_without_training_set_stats(tiny_model_dir, tmp_path):
    from salsa_lightning.modules.ppo import PPOModule, PPOSpec
    from salsa_lightning.reward.model import reward_stats

    data = write_jsonl(tmp_path / "prefs.jsonl", addition_preferences(16))
    fit_out, out = tmp_path / "reward", tmp_path / "exported"
    cli_main(reward_args(str(tiny_model_dir), str(data), str(fit_out), "--trainer.max_epochs=2",
                         "--trainer.enable_checkpointing=true", f"--trainer.default_root_dir={tmp_path}"))  # fmt: skip
    (ckpt,) = (tmp_path / "checkpoints").glob("*.ckpt")
    cli_main(["export", f"--checkpoint={ckpt}", f"--output_dir={out}"])

    assert_equal_weights(fit_out / "model.safetensors", out / "model.safetensors")
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    fit_manifest = json.loads((fit_out / MANIFEST_NAME).read_text())
    assert manifest.keys() >= fit_manifest.keys()  # the same fields as the stage writes (plus where it came from)
    assert manifest["stage"] == "reward" and manifest["base_model"] == fit_manifest["base_model"]
    assert reward_stats(fit_out) and reward_stats(out) is None and "training data" in manifest["reward_stats_note"]
    with pytest.raises(SalsaError, match="normalize_reward needs reward stats"):
        PPOModule(policy_init=str(tiny_model_dir), reward_model=str(out), ppo=PPOSpec(normalize_reward=True))


# ---------------------------------------------------------------- bad input: one sentence, exit 2, nothing written


class RunsCode:
    """Unpickling this prints: a stand-in for a checkpoint crafted to run code."""

    def __reduce__(self):
        return (print, ("CODE RAN",))


def _bad_checkpoint(kind: str, tmp_path: Path, lora_run) -> Path:
    if kind == "missing":
        return tmp_path / "nope.ckpt"
    if kind == "plain directory":
        (tmp_path / "plain").mkdir()
        (tmp_path / "plain" / "notes.txt").write_text("hi")
        return tmp_path / "plain"
    if kind == "stage output":
        return lora_run[2]
    if kind == "not a checkpoint":
        (tmp_path / "x.ckpt").write_bytes(b"not a checkpoint")
        return tmp_path / "x.ckpt"
    if kind == "code in a .ckpt":
        torch.save({"state_dict": {}, "hyper_parameters": {"x": RunsCode()}}, tmp_path / "evil.ckpt")
        return tmp_path / "evil.ckpt"
    if kind == "code in a DCP index":
        d = tmp_path / "evil-dcp"
        d.mkdir()
        torch.save({"hyper_parameters": {}}, d / "meta.pt")
        (d / ".metadata").write_bytes(pickle.dumps(RunsCode()))
        return d
    hparams = {
        "ppo checkpoint": {"_class_path": "salsa_lightning.modules.ppo.PPOModule"},
        "unknown field": {"_class_path": SFT_CLASS, "model": {"name_or_path": str(lora_run[2]), "no_such_field": 1}},
        "base model gone": {"_class_path": SFT_CLASS, "model": {"name_or_path": str(tmp_path / "gone")}},
        "weights that do not fit": {"_class_path": SFT_CLASS, "model": {"name_or_path": str(lora_run[2])}},
    }[kind]
    torch.save({"state_dict": {"x": torch.zeros(2)}, "hyper_parameters": hparams}, tmp_path / "made.ckpt")
    return tmp_path / "made.ckpt"


@pytest.mark.parametrize(
    "kind, match",
    [
        ("missing", "nope.ckpt does not exist"),
        ("plain directory", "is not a distributed checkpoint"),
        ("stage output", "is already a stage output"),
        ("not a checkpoint", "is not a Lightning checkpoint that loads without running code"),
        ("code in a .ckpt", "is not a Lightning checkpoint that loads without running code"),
        ("code in a DCP index", "cannot be read safely"),
        ("ppo checkpoint", "do not fit PPOModule of this salsa_lightning version"),  # (one is exported: test_ppo)
        ("unknown field", "do not fit SFTModule of this salsa_lightning version"),
        ("base model gone", "gone does not exist; check the path"),
        ("weights that do not fit", "do not fit the model its hyper_parameters describe"),
    ],
)
def test_bad_checkpoint_is_one_sentence_and_writes_nothing(kind, match, tmp_path, lora_run, capsys):
    out = tmp_path / "out" / "exported"
    checkpoint = _bad_checkpoint(kind, tmp_path, lora_run)
    with pytest.raises(SystemExit) as exit_info:
        main(["export", f"--checkpoint={checkpoint}", f"--output_dir={out}"])
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    err = " ".join(captured.err.split())
    assert "error:" in err and match in err and "Traceback" not in err, err
    assert "CODE RAN" not in captured.out + captured.err
    assert not (tmp_path / "out").exists()


def test_existing_output_dir_is_refused_and_left_untouched(lora_run, tmp_path, capsys):
    out = tmp_path / "exported"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(SystemExit) as exit_info:
        main(["export", f"--checkpoint={lora_run[1]}", f"--output_dir={out}"])
    assert exit_info.value.code == 2
    assert "already exists" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["exported"] and [p.name for p in out.iterdir()] == ["keep.txt"]


def test_export_help_names_its_flags_and_the_reward_caveat(capsys):
    with pytest.raises(SystemExit):
        cli_main(["export", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--checkpoint" in text and "--output_dir" in text and "--overwrite" in text
    assert "normalize_reward" in text and "ModelParallelStrategy" in text
