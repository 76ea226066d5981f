"""Resume is exact: a run killed and resumed from any checkpoint (mid-epoch, after an epoch's last batch, the
default per-epoch one) ends with the same weights, bit for bit, and logs the same metrics as an uninterrupted run;
for SFT (LoRA dropout on), reward (attention dropout on) and PPO. And on resume the command line wins over the
checkpoint's saved hyper-parameters.

Each stage runs 3 epochs of 3 shuffled batches. The killed run stops after batch 5 (mid-epoch 2), writing a
checkpoint after every batch and the default one after every epoch; each resume starts from one of them, which is
the state a run killed right there would have left."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from helpers import (
    addition_conversations,
    addition_preferences,
    ppo_args,
    reward_args,
    sft_args,
    write_jsonl,
    write_prompts,
)

from salsa_lightning.cli import cli_main, main
from salsa_lightning.stage import MANIFEST_NAME

BATCHES_PER_EPOCH, KILL_AFTER = 3, 5
# checkpoint -> what it is: after batch 5 (mid-epoch 2; the kill), after batch 3 (the end of epoch 1, saved before
# its validation), and the default per-epoch checkpoint of epoch 1
RESUME_FROM = ("batch5", "batch3", "epoch0")


def checkpointing(root: Path) -> list[str]:
    return [
        "--trainer.enable_checkpointing=true",
        f"--trainer.default_root_dir={root}",
        "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
        f"--trainer.callbacks.dirpath={root / 'batches'}",
        "--trainer.callbacks.filename={step}",
        "--trainer.callbacks.every_n_train_steps=1",
        "--trainer.callbacks.save_top_k=-1",
        "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",  # Lightning's default one, per epoch
        f"--trainer.callbacks.dirpath={root / 'epochs'}",
        "--trainer.callbacks.save_top_k=-1",  # (keeping each, not only the latest)
    ]


def csv_logging(root: Path) -> list[str]:
    return [
        "--trainer.logger=lightning.pytorch.loggers.CSVLogger",
        f"--trainer.logger.save_dir={root}",
        "--trainer.log_every_n_steps=1",
    ]


def checkpoint(root: Path, name: str) -> Path:
    """`batchN`: the checkpoint written after the N-th training batch; `epochN`: the per-epoch one of epoch N."""
    if name.startswith("epoch"):
        return next((root / "epochs").glob(f"{name.replace('epoch', 'epoch=')}-*.ckpt"))
    for path in (root / "batches").glob("*.ckpt"):
        loops = torch.load(path, weights_only=True)["loops"]["fit_loop"]
        if loops["epoch_loop.batch_progress"]["total"]["processed"] == int(name.removeprefix("batch")):
            return path
    raise FileNotFoundError(name)


def trainable(module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}


def logged_rows(root: Path) -> list[dict[str, str]]:
    """What Lightning logged (CSVLogger writes each value as repr(float): exact)."""
    (path,) = root.rglob("metrics.csv")
    with path.open() as f:
        return list(csv.DictReader(f))


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys() and a
    differ = [n for n in a if not torch.equal(a[n], b[n])]
    assert not differ, f"{len(differ)} of {len(a)} tensors differ, e.g. {differ[0]}"


def check_resumes(run, tmp_path: Path, compare_logs) -> None:
    """`run(root, *extra)` runs the stage 3 epochs with checkpoints under `root`, returning the CLI."""
    whole = run(tmp_path / "whole")
    killed = run(
        tmp_path / "killed",
        "--trainer.callbacks+=helpers.KillAfterBatches",
        f"--trainer.callbacks.batches={KILL_AFTER}",
    )
    assert killed.trainer.fit_loop.epoch_loop.batch_progress.total.processed == KILL_AFTER
    expected = trainable(whole.model)
    assert not all(torch.equal(expected[n], p) for n, p in trainable(killed.model).items())  # the kill came early
    for name in RESUME_FROM:
        ckpt = checkpoint(tmp_path / "killed", name)
        resumed = run(tmp_path / f"from-{name}", f"--ckpt_path={ckpt}")
        assert_same_weights(expected, trainable(resumed.model))
        compare_logs(whole, resumed, ckpt)


def assert_same_lightning_logs(whole, resumed, ckpt: Path) -> None:
    # the resumed run logs what the uninterrupted one logged from the checkpoint's step on (epoch means included,
    # so the running metric sums of a mid-epoch checkpoint were restored too)
    step = torch.load(ckpt, weights_only=True)["global_step"]
    after = [r for r in logged_rows(Path(whole.trainer.default_root_dir)) if int(r["step"]) >= step]
    assert after and any(k.startswith("train/") and v for r in after for k, v in r.items())
    assert logged_rows(Path(resumed.trainer.default_root_dir)) == after


@pytest.fixture(scope="module")
def dropout_model_dir(tmp_path_factory) -> Path:
    """The tiny Llama with attention dropout on, so that a full-weight run draws dropout masks too."""
    from salsa_lightning.models.tiny import save_tiny_checkpoint

    path = save_tiny_checkpoint(tmp_path_factory.mktemp("tiny-dropout"), seed=0)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "attention_dropout": 0.1}))
    return path


def test_sft_resumes_bit_for_bit(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "sft.jsonl", addition_conversations(32))  # 24 train rows: 3 batches of 8

    def run(root: Path, *extra: str):
        return cli_main(sft_args(str(tiny_model_dir), str(data), None, "--trainer.max_epochs=3", "--model.model.lora.r=4",
                                 "--model.model.lora.dropout=0.1", "--model.optim.lr=1e-2",
                                 "--trainer.enable_progress_bar=false", *checkpointing(root), *csv_logging(root), *extra))  # fmt: skip

    check_resumes(run, tmp_path, assert_same_lightning_logs)


def test_reward_resumes_bit_for_bit(dropout_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "prefs.jsonl", addition_preferences(32))

    def run(root: Path, *extra: str):
        return cli_main(reward_args(str(dropout_model_dir), str(data), None, "--trainer.max_epochs=3",
                                    "--model.optim.lr=1e-3", "--trainer.enable_progress_bar=false", *checkpointing(root),
                                    *csv_logging(root), *extra))  # fmt: skip

    check_resumes(run, tmp_path, assert_same_lightning_logs)


def test_ppo_resumes_bit_for_bit(ppo_pipeline, tmp_path):
    prompts = write_prompts(tmp_path / "prompts.jsonl", 12, seed=9)  # 3 rollouts of 4 prompts per epoch

    def run(root: Path, *extra: str):
        return cli_main(ppo_args(str(ppo_pipeline / "sft1"), str(prompts), "--data.batch_size=4", "--trainer.max_epochs=3",
                                 "--model.optim.lr=1e-2", *checkpointing(root), *extra,
                                 reward=str(ppo_pipeline / "rm")))  # fmt: skip

    def same_history(whole, resumed, ckpt: Path) -> None:
        def curve(cli):
            return [{k: v for k, v in h.items() if not k.startswith("time/")} for h in cli.model.history]

        assert len(curve(whole)) == 3 * BATCHES_PER_EPOCH
        assert curve(resumed) == curve(whole)  # exact floats: the kill and resume changed no number

    check_resumes(run, tmp_path, same_history)


@pytest.fixture(scope="module")
def sft_checkpoint(tiny_model_dir, tmp_path_factory) -> tuple[Path, Path, Path]:
    """An SFT checkpoint (after one epoch) of a run whose output_dir was `old/`: (checkpoint, data, root)."""
    root = tmp_path_factory.mktemp("cli-wins")
    data = write_jsonl(root / "sft.jsonl", addition_conversations(16))
    main(sft_args(str(tiny_model_dir), str(data), str(root / "old"), "--trainer.max_epochs=1", "--model.optim.lr=1e-3",
                  "--trainer.enable_checkpointing=true", f"--trainer.default_root_dir={root / 'run'}"))  # fmt: skip
    return next((root / "run").rglob("*.ckpt")), data, root


def test_command_line_wins_over_the_checkpoints_hyper_parameters(tiny_model_dir, sft_checkpoint):
    ckpt, data, root = sft_checkpoint
    args = sft_args(str(tiny_model_dir), str(data), str(root / "new"), "--trainer.max_epochs=2", f"--ckpt_path={ckpt}",
                    f"--trainer.default_root_dir={root / 'resumed'}")  # fmt: skip
    resumed = cli_main([*args, "--model.optim.lr=2e-3"])
    assert resumed.model.output_dir == str(root / "new") and resumed.model.optim.lr == 2e-3
    assert (root / "new" / MANIFEST_NAME).exists()
    assert (
        json.loads((root / "new" / MANIFEST_NAME).read_text())["global_step"]
        == 2 * resumed.trainer.num_training_batches
    )
    # what the command line leaves out still comes from the checkpoint (lr 1e-3, not the default 2.5e-5)
    again = cli_main([*args, "--model.overwrite=true", f"--trainer.default_root_dir={root / 'again'}"])
    assert again.model.optim.lr == 1e-3


def test_resuming_with_another_model_class_is_refused(tiny_model_dir, sft_checkpoint, capsys):
    ckpt, data, root = sft_checkpoint
    args = reward_args(str(tiny_model_dir), str(data), str(root / "rm"), f"--ckpt_path={ckpt}")
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "written by salsa_lightning.modules.sft.SFTModule" in err and "RewardModule" in err
    assert not (root / "rm").exists()
