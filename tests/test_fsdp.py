"""FSDP2 (`fully_shard` per decoder layer under Lightning's ModelParallelStrategy) on CPU with gloo.

For each training stage, a 2-process run must follow the single-process run with the same global batch step
for step, and export the same HF-format weights."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import addition_preferences, ppo_args, reward_args, sft_args, write_jsonl, write_prompts
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


# PPO rollouts that two runs can compare: greedy, and no EOS before the last token (equal token counts per row)
GREEDY_FIXED_LENGTH = [
    "--model.generation.do_sample=false",
    "--model.generation.max_new_tokens=6",
    "--model.generation.min_new_tokens=6",
]


def torchrun(args: list[str], cwd: Path, nproc: int = 2) -> str:
    """`python -m salsa_lightning ARGS` on `nproc` CPU processes (gloo), as a user launches it with torchrun; returns
    what they printed."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT / "tests")]), "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    proc = subprocess.run([*cmd, "-m", "salsa_lightning", *args], env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout + proc.stderr


def mean_over_ranks(path_prefix: Path, nproc: int = 2) -> list[float]:
    """Each rank's loss is the mean over its share of the global batch; equal shares -> the mean of the means."""
    per_rank = [json.loads(Path(f"{path_prefix}.rank{r}.json").read_text()) for r in range(nproc)]
    return [sum(step) / nproc for step in zip(*per_rank, strict=True)]


def assert_same_safetensors(a_path: Path, b_path: Path) -> None:
    """Equal weights, and the second directory's manifest says it was trained sharded on two processes."""
    from safetensors.torch import load_file

    manifest = json.loads((b_path.parent / "salsa_manifest.json").read_text())
    assert manifest["training"] == {"world_size": 2, "sharded": True}

    a, b = load_file(str(a_path)), load_file(str(b_path))
    assert a.keys() == b.keys()
    for k in a:
        # atol 3e-5: two ranks sum gradients in another order than one process does, and AdamW's normalised step
        # turns that rounding into up to ~1.3e-5 on near-zero-gradient weights after a few epochs (measured: the
        # FSDP1 reward test, 1 of 2048 elements of one matrix at 1.28e-5 on torch 2.13.0+cpu); a real sharding bug
        # moves whole tensors by far more
        torch.testing.assert_close(b[k], a[k], atol=3e-5, rtol=RTOL, msg=k)


@pytest.mark.distributed
def test_fsdp2_sft_on_two_processes_matches_one_process(tiny_model_dir, tmp_path):
    data = str(write_jsonl(tmp_path / "sft.jsonl", equal_length_conversations()))
    single = cli_main(
        common_args(str(tiny_model_dir), data, str(tmp_path / "single"), str(tmp_path / "single-loss"))
        + ["--data.batch_size=8"]
    )
    reference = loss_history(single)
    assert len(reference) == 4

    args = common_args(str(tiny_model_dir), data, str(tmp_path / "sharded"), str(tmp_path / "sharded-loss"))
    torchrun(args + ["--data.batch_size=4", "--trainer.devices=2", STRATEGY], tmp_path)
    assert mean_over_ranks(tmp_path / "sharded-loss") == pytest.approx(reference, rel=RTOL)
    assert reference[-1] < reference[0]  # it trained, so agreement is not the trivial one
    # the exported stage output is the plain HF model of the unsharded run
    assert_same_safetensors(tmp_path / "single" / "model.safetensors", tmp_path / "sharded" / "model.safetensors")


@pytest.mark.distributed
def test_fsdp2_reward_lora_on_two_processes_matches_one_process(tiny_model_dir, tmp_path):
    """The reward stage in LoRA mode (the quickstart's): a fresh adapter + head on the frozen base, sharded."""
    data = str(write_jsonl(tmp_path / "prefs.jsonl", addition_preferences(10)))

    def args(out: str, history: str) -> list[str]:
        # 8 training pairs = one global batch per epoch; Bradley-Terry is a mean over pairs, so equal shares agree;
        # no LoRA dropout: its random masks would differ between one process and two
        return reward_args(str(tiny_model_dir), data, str(tmp_path / out), "--trainer.max_epochs=3",
                           "--data.val_fraction=0.2", "--trainer.limit_val_batches=0", "--model.model.lora.r=4",
                           "--model.model.lora.dropout=0",
                           "--model.optim.lr=5e-3", "--trainer.enable_progress_bar=false",
                           "--trainer.callbacks+=scale_helpers.LossHistory",
                           f"--trainer.callbacks.path={tmp_path / history}")  # fmt: skip

    reference = loss_history(cli_main(args("single", "single-loss") + ["--data.batch_size=8"]))
    torchrun(args("sharded", "sharded-loss") + ["--data.batch_size=4", "--trainer.devices=2", STRATEGY], tmp_path)
    assert mean_over_ranks(tmp_path / "sharded-loss") == pytest.approx(reference, rel=RTOL)
    assert reference[-1] < reference[0]
    assert_same_safetensors(
        tmp_path / "single" / "adapter_model.safetensors", tmp_path / "sharded" / "adapter_model.safetensors"
    )
    # the training-set reward statistics (a forward over every pair on every rank) agree too
    single = json.loads((tmp_path / "single" / "salsa_manifest.json").read_text())["reward_stats"]
    sharded = json.loads((tmp_path / "sharded" / "salsa_manifest.json").read_text())["reward_stats"]
    assert sharded == pytest.approx(single, rel=1e-4)


def perturbed_copy(model_dir: Path, out: Path) -> Path:
    """Another full-weight "seed": the model with every weight nudged (tokenizer unchanged)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.02)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(out)
    return out


@pytest.mark.distributed
@pytest.mark.parametrize("layout", ["full", "lora", "full-weight seeds"])
def test_fsdp2_ppo_on_two_processes_matches_one_process(layout, ppo_pipeline, tiny_model_dir, tmp_path):
    """PPO with sharded generation, anchors, reward model and critic.

    SALSA (soup anchor, KL to init logged too) with a reward model, in both layouts: `full` = policy, init, soup,
    reward and critic as five separately sharded models (adapters merged); `lora` = policy, init, soup, reward
    and value adapters on ONE sharded base; `full-weight seeds` = a full-weight policy and an in-memory soup of two
    full-weight seeds, which the sharded run reads straight into shards (each rank only its rows of each input)
    while the single process averages whole state dicts.
    Greedy rollouts of a fixed length (no EOS before `max_new_tokens`) make the two runs see the same tokens and
    equal token counts per rank; advantages are whitened with the global batch's statistics on both."""
    prompts = write_prompts(tmp_path / "prompts.jsonl", 8, seed=4)
    policy, reward = str(ppo_pipeline / "sft1"), str(ppo_pipeline / "rm")
    extra = [f"--model.soup={ppo_pipeline / 'soup'}", "--model.anchor=soup"]
    if layout == "full-weight seeds":
        policy, layout = str(tiny_model_dir), "full"
        extra = [f"--model.soup_inputs=[{policy},{perturbed_copy(tiny_model_dir, tmp_path / 'seed2')}]",
                 "--model.soup_weights=[0.3,0.7]", "--model.anchor=soup"]  # fmt: skip

    def args(out: str) -> list[str]:
        return ppo_args(policy, str(prompts), *extra, "--trainer.max_epochs=3", "--model.ppo.ppo_epochs=1",
                        *GREEDY_FIXED_LENGTH, "--model.optim.lr=1e-3", f"--model.layout={layout}",
                        f"--model.output_dir={tmp_path / out}", reward=reward)  # fmt: skip

    def sharded_args(out: str, *extra: str) -> list[str]:
        # a sharded (distributed) checkpoint after every update, to resume from
        return args(out) + ["--data.batch_size=4", "--model.ppo.mini_batch_size=4", "--trainer.devices=2", STRATEGY,
                            "--trainer.enable_checkpointing=true",
                            "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
                            f"--trainer.callbacks.dirpath={tmp_path / (out + '-ckpt')}",
                            "--trainer.callbacks.filename={epoch}", "--trainer.callbacks.save_top_k=-1", *extra]  # fmt: skip

    single = cli_main(args("single") + ["--data.batch_size=8", "--model.ppo.mini_batch_size=8"])
    printed = torchrun(sharded_args("sharded"), tmp_path)
    # the LoRA layout builds its base on the meta device and reads each rank's rows (not a whole base per rank)
    assert ("read straight into FSDP2 shards" in printed) == (layout == "lora")
    reference = [{k: v for k, v in h.items() if not k.startswith("time/")} for h in single.model.history]
    sharded = json.loads((tmp_path / "sharded" / "history.json").read_text())
    assert len(reference) == len(sharded) == 3
    keys = ["objective/scores", "objective/kl", "objective/rlhf_reward", "loss/policy_avg", "loss/value_avg",
            "policy/approxkl_avg", "objective/kl_init", "val/num_eos_tokens"]  # fmt: skip
    for ref, got in zip(reference, sharded, strict=True):
        for k in keys:
            assert got[k] == pytest.approx(ref[k], rel=1e-3, abs=1e-5), (k, ref["step"])
    assert reference[-1]["objective/kl"] != 0  # the policy moved, so agreement is not the trivial one
    name = "model.safetensors" if layout == "full" else "adapter_model.safetensors"
    assert_same_safetensors(tmp_path / "single" / name, tmp_path / "sharded" / name)
    if layout == "lora":
        # resume the sharded run from its sharded checkpoint after update 1: the same updates 2 and 3, the same policy
        ckpt = tmp_path / "sharded-ckpt" / "epoch=0.ckpt"
        assert (ckpt / ".metadata").is_file()  # a torch distributed checkpoint (a directory of shards)
        torchrun(sharded_args("resumed", f"--ckpt_path={ckpt}"), tmp_path)
        resumed = json.loads((tmp_path / "resumed" / "history.json").read_text())
        assert len(resumed) == 3
        for got, ref in zip(resumed, sharded, strict=True):
            for k in keys:
                assert got[k] == pytest.approx(ref[k], rel=1e-6, abs=1e-8), (k, ref["step"])
        assert_same_safetensors(tmp_path / "sharded" / name, tmp_path / "resumed" / name)


@pytest.mark.gpu
@pytest.mark.distributed
@pytest.mark.parametrize("stage", ["sft", "salsa-lora", "salsa-full-seeds"])
def test_fsdp2_on_one_gpu_in_bf16(stage, tiny_model_dir, ppo_pipeline, tmp_path):
    """The CUDA path (NCCL, weights read into shards on the GPU, bf16): one process on the one GPU a machine may
    lend; its first loss matches an unsharded bf16 run on the same GPU, training moves it, the output is written."""
    gpu = ["--trainer.accelerator=gpu", "--trainer.devices=1", "--trainer.precision=bf16-true"]
    one_rank = (
        '--trainer.strategy={"class_path": "lightning.pytorch.strategies.ModelParallelStrategy", '
        '"init_args": {"data_parallel_size": 1, "tensor_parallel_size": 1}}'
    )
    if stage == "sft":
        data = str(write_jsonl(tmp_path / "sft.jsonl", equal_length_conversations()))
        args = lambda out: common_args(str(tiny_model_dir), data, str(tmp_path / out), str(tmp_path / f"{out}-loss"))  # noqa: E731
        reference = loss_history(cli_main(args("single") + ["--data.batch_size=8", *gpu]))
        torchrun(args("sharded") + ["--data.batch_size=8", *gpu, one_rank], tmp_path, nproc=1)
        sharded = mean_over_ranks(tmp_path / "sharded-loss", nproc=1)
        weights = "model.safetensors"
    else:
        prompts = write_prompts(tmp_path / "prompts.jsonl", 8, seed=4)
        policy, extra = str(ppo_pipeline / "sft1"), [f"--model.soup={ppo_pipeline / 'soup'}"]
        if stage == "salsa-full-seeds":
            policy = str(tiny_model_dir)
            extra = [f"--model.soup_inputs=[{policy},{perturbed_copy(tiny_model_dir, tmp_path / 'seed2')}]"]

        def args(out: str) -> list[str]:
            return ppo_args(policy, str(prompts), *extra, "--model.anchor=soup", "--trainer.max_epochs=3",
                            *GREEDY_FIXED_LENGTH, "--model.optim.lr=1e-3", *gpu,
                            f"--model.output_dir={tmp_path / out}", reward=str(ppo_pipeline / "rm"))  # fmt: skip

        reference = [h["objective/rlhf_reward"] for h in cli_main(args("single")).model.history]
        torchrun(args("sharded") + [one_rank], tmp_path, nproc=1)
        history = json.loads((tmp_path / "sharded" / "history.json").read_text())
        sharded = [h["objective/rlhf_reward"] for h in history]
        assert history[-1]["objective/kl"] != 0  # the policy moved
        weights = "model.safetensors" if stage.endswith("full-seeds") else "adapter_model.safetensors"
    assert sharded[0] == pytest.approx(reference[0], rel=2e-2)  # before any update: the same model, bf16 noise
    assert all(math.isfinite(x) for x in sharded)
    manifest = json.loads((tmp_path / "sharded" / "salsa_manifest.json").read_text())
    assert manifest["training"] == {"world_size": 1, "sharded": True}
    assert (tmp_path / "sharded" / weights).is_file()
