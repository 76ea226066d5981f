"""FSDP2 (`fully_shard` per decoder layer under Lightning's ModelParallelStrategy) on CPU with gloo.

A 2-process run must follow the single-process run with the same global batch step for step, and export the
same HF-format weights."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import sft_args, write_jsonl
from scale_helpers import loss_history

from salsa_lightning.cli import cli_main

ROOT = Path(__file__).resolve().parents[1]
# float32 on CPU: sharded and unsharded runs differ only in summation order (all-reduce vs one process)
RTOL = 1e-4
# Lightning's "auto" would put both processes on the tensor-parallel axis; the stages shard with FSDP only
STRATEGY = (
    '--trainer.strategy={"class_path": "lightning.pytorch.strategies.ModelParallelStrategy", '
    '"init_args": {"data_parallel_size": 2, "tensor_parallel_size": 1}}'
)


def equal_length_conversations() -> list[dict]:
    """Ten distinct rows with the same number of tokens each, so that the mean of per-rank token-mean losses is
    the global token mean (the single-process loss) exactly."""
    pairs = [(1, 2), (3, 4), (2, 5), (6, 1), (0, 7), (4, 4), (5, 3), (2, 2), (1, 6), (3, 3)]
    return [
        {
            "messages": [
                {"role": "user", "content": f"What is {a} + {b}?"},
                {"role": "assistant", "content": f"The answer is {a + b}."},
            ]
        }
        for a, b in pairs
    ]


def common_args(model: str, data: str, out: str, history: str) -> list[str]:
    # 8 training rows = one global batch per epoch, so the data order (per-process samplers) cannot matter
    return sft_args(model, data, out, "--trainer.max_epochs=4", "--data.val_fraction=0.2", "--trainer.limit_val_batches=0",
                    "--model.optim.lr=5e-3", "--model.optim.warmup_ratio=0", "--trainer.enable_progress_bar=false",
                    "--trainer.callbacks+=scale_helpers.LossHistory", f"--trainer.callbacks.path={history}")  # fmt: skip


@pytest.mark.distributed
def test_fsdp2_sft_on_two_processes_matches_one_process(tiny_model_dir, tmp_path):
    from safetensors.torch import load_file

    data = str(write_jsonl(tmp_path / "sft.jsonl", equal_length_conversations()))
    single = cli_main(
        common_args(str(tiny_model_dir), data, str(tmp_path / "single"), str(tmp_path / "single-loss"))
        + ["--data.batch_size=8"]
    )
    reference = loss_history(single)
    assert len(reference) == 4

    args = common_args(str(tiny_model_dir), data, str(tmp_path / "sharded"), str(tmp_path / "sharded-loss"))
    args += ["--data.batch_size=4", "--trainer.devices=2", STRATEGY]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT / "tests")]), "HF_HUB_OFFLINE": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "salsa_lightning",
        *args,
    ]
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]

    per_rank = [json.loads((tmp_path / f"sharded-loss.rank{r}.json").read_text()) for r in (0, 1)]
    sharded = [(a + b) / 2 for a, b in zip(*per_rank, strict=True)]  # each rank's loss is its half of the global batch
    assert sharded == pytest.approx(reference, rel=RTOL)
    assert reference[-1] < reference[0]  # it trained, so agreement is not the trivial one

    # the exported stage output is the plain HF model of the unsharded run
    a = load_file(str(tmp_path / "single" / "model.safetensors"))
    b = load_file(str(tmp_path / "sharded" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-5, rtol=RTOL, msg=k)
