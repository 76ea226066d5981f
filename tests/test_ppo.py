"""The PPO stage: layouts agree, anchors reduce to each other where the math says so, training moves the
reward, resume is exact, outputs reload, and bad input is refused clearly."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from helpers import ppo_args, write_jsonl

from salsa_lightning.cli import cli_main, main
from salsa_lightning.models.loading import ModelSpec
from salsa_lightning.stage import MANIFEST_NAME


@pytest.fixture
def pipeline(ppo_pipeline):
    return ppo_pipeline


def run(pipeline: Path, *extra: str, reward: bool = True, **kwargs):
    return cli_main(
        ppo_args(
            str(pipeline / "sft1"),
            str(pipeline / "prompts.jsonl"),
            *extra,
            reward=str(pipeline / "rm") if reward else None,
            **kwargs,
        )  # fmt: skip
    )


def curves(cli) -> list[dict[str, float]]:
    return [{k: v for k, v in h.items() if not k.startswith("time/")} for h in cli.model.history]


def assert_same_curves(a, b, rel=1e-5, clip_slack=0.0):
    """Every logged number equal to `rel`; a clip fraction to `clip_slack` (a token whose ratio sits on the clip
    boundary falls either side of it with rounding-level changes)."""
    assert len(a) == len(b) and a
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            assert x[k] == pytest.approx(y[k], rel=rel, abs=max(1e-6, clip_slack if "clipfrac" in k else 0)), k


def test_layouts_give_the_same_numbers(pipeline):
    from salsa_lightning.ppo.build import FullStack, LoraStack
    from salsa_lightning.rl.sequences import position_ids_from_mask

    anchors = {"init": str(pipeline / "sft1"), "soup": str(pipeline / "sft2")}
    args = (ModelSpec(dtype="float32"), str(pipeline / "sft1"), anchors, str(pipeline / "rm"), "copy")
    full, lora = FullStack(*args).eval(), LoraStack(*args).eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 300, (3, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # left padding
    mask[2, :2] = 0
    pos = position_ids_from_mask(mask)
    with torch.no_grad():
        torch.testing.assert_close(
            full.logits("policy", ids, mask, pos), lora.logits("policy", ids, mask, pos), atol=1e-4, rtol=1e-4
        )
        torch.testing.assert_close(
            full.logits("soup", ids, mask, pos), lora.logits("soup", ids, mask, pos), atol=1e-4, rtol=1e-4
        )
        torch.testing.assert_close(full.reward_scores(ids, mask), lora.reward_scores(ids, mask), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(full.values(ids, mask, pos), lora.values(ids, mask, pos), atol=1e-4, rtol=1e-4)
        # only the last `keep` positions' logits are computed (the response's): the same numbers as slicing all
        for stack in (full, lora):
            whole = stack.logits("policy", ids, mask, pos)
            torch.testing.assert_close(stack.logits("policy", ids, mask, pos, keep=5), whole[:, -5:])
            assert stack.logits("soup", ids, mask, pos, keep=5).shape[1] == 5
    # only the policy and the critic train in the LoRA layout; the base and the other adapters are frozen
    trainable = {n for n, p in lora.named_parameters() if p.requires_grad}
    assert trainable and all(".policy." in n or ".value." in n or n.startswith("value_head") for n in trainable)


def test_soup_of_identical_seeds_equals_init_step_for_step(pipeline):
    steps = ("--trainer.max_epochs=2", "--model.optim.lr=1e-2")
    soup = pipeline / "soup-identical"  # the exact (cat) LoRA soup of seed 1 with itself: rank 8, same delta
    ppo = run(pipeline, *steps, "--model.anchor=init", f"--model.soup={soup}")
    salsa = run(pipeline, *steps, "--model.anchor=soup", f"--model.soup={soup}")
    # the anchors are the same function in two forms (rank 4 and the rank-8 cat soup): equal to rounding
    # (one token of one 32-token minibatch, in an update's mean over 4 minibatches, is 1/128)
    assert_same_curves(curves(ppo), curves(salsa), rel=1e-3, clip_slack=1 / 128)
    assert any(h["objective/kl"] > 0 for h in curves(ppo))  # the policy moved, so the match is not vacuous


def test_mkl_over_one_anchor_equals_ppo(pipeline):
    steps = ("--trainer.max_epochs=2", "--model.optim.lr=1e-2")
    ppo = run(pipeline, *steps, "--model.anchor=init")
    mkl = run(pipeline, *steps, f"--model.anchor=[{pipeline / 'sft1-copy'}]")
    a, b = curves(ppo), curves(mkl)
    for h in a + b:
        h.pop("objective/kl_init", None)
    assert_same_curves(a, b)


def test_mkl_is_the_mean_of_the_anchor_kls(pipeline):
    cli = run(
        pipeline,
        "--trainer.max_steps=1",
        f"--model.anchor=[{pipeline / 'sft1'},{pipeline / 'sft2'}]",
        f"--model.soup={pipeline / 'sft2'}",
    )
    h = cli.model.history[0]
    # KL to sft1 (init) is 0 at the first rollout, so the mean over the two anchors is half the KL to sft2 (soup)
    assert h["objective/kl"] == pytest.approx((h["objective/kl_init"] + h["objective/kl_soup"]) / 2, rel=1e-4, abs=1e-6)


def test_output_reloads_with_peft_and_logs_both_kls(pipeline, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "salsa"
    cli = run(pipeline, "--trainer.max_epochs=1", "--model.optim.lr=1e-2", "--model.anchor=soup",
              f"--model.soup={pipeline / 'soup'}", f"--model.output_dir={out}")  # fmt: skip
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert manifest["stage"] == "salsa" and manifest["format"] == "lora"
    history = json.loads((out / "history.json").read_text())
    required = ["objective/kl", "objective/kl_init", "objective/kl_soup", "objective/scores", "objective/non_score_reward",
                "objective/rlhf_reward", "objective/entropy", "policy/approxkl_avg", "policy/clipfrac_avg", "loss/policy_avg",
                "loss/value_avg", "val/clipfrac_avg", "val/explained_variance", "val/num_eos_tokens", "response_length", "kl_coef"]  # fmt: skip
    assert all(k in history[0] for k in required), set(required) - set(history[0])

    base = AutoModelForCausalLM.from_pretrained(
        json.loads((pipeline / "sft1" / "adapter_config.json").read_text())["base_model_name_or_path"]
    )
    reloaded = PeftModel.from_pretrained(base, out).eval()
    ids = torch.randint(3, 300, (2, 10))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        ours = cli.model.stack.logits("policy", ids, mask, None)
        theirs = reloaded(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_resume_after_kill_matches_uninterrupted_run(pipeline, tmp_path):
    common = ("--model.optim.lr=1e-2", "--trainer.enable_checkpointing=true", "--trainer.limit_train_batches=1")
    whole = run(pipeline, *common, "--trainer.max_epochs=3", f"--trainer.default_root_dir={tmp_path / 'a'}")
    killed = run(pipeline, *common, "--trainer.max_epochs=3", f"--trainer.default_root_dir={tmp_path / 'b'}",
                 "--trainer.callbacks+=helpers.KillAfterEpochs", "--trainer.callbacks.epochs=2")  # fmt: skip
    assert killed.model.updates_done == 2
    ckpt = next((tmp_path / "b").rglob("*.ckpt"))
    resumed = run(
        pipeline,
        *common,
        "--trainer.max_epochs=3",
        f"--trainer.default_root_dir={tmp_path / 'c'}",
        f"--ckpt_path={ckpt}",
    )
    a = {n: p for n, p in whole.model.stack.named_parameters() if p.requires_grad}
    b = {n: p for n, p in resumed.model.stack.named_parameters() if p.requires_grad}
    assert a.keys() == b.keys()
    for n in a:
        torch.testing.assert_close(a[n], b[n], msg=n)
    assert_same_curves(curves(whole), curves(resumed))


def test_kl_hack_monitor_stops_training(pipeline):
    # a reward that pays for brevity collapses response length; the monitor must stop the run early
    cli = run(pipeline, "--trainer.max_epochs=20", "--model.optim.lr=1e-2", "--model.layout=full", "--model.ppo.kl_coef=0.01",
              "--model.kl_hack.min_fraction=0.7", "--model.kl_hack.action=stop", "--model.kl_hack.patience=1",
              reward=False, reward_fn="helpers:shorter_is_better")  # fmt: skip
    lengths = [h["response_length"] for h in cli.model.history]
    assert len(lengths) < 40, lengths  # stopped before max_epochs
    assert lengths[-1] < 0.7 * lengths[0]


def test_programmatic_reward_rises_while_kl_stays_finite(pipeline):
    cli = run(pipeline, "--trainer.max_epochs=24", "--model.optim.lr=5e-3", "--model.layout=full", "--model.ppo.kl_coef=0.01",
              reward=False, reward_fn="helpers:fraction_of_a")  # fmt: skip
    scores = [h["objective/scores"] for h in cli.model.history]
    kls = [h["objective/kl"] for h in cli.model.history]
    assert len(scores) == 48
    first, last = sum(scores[:8]) / 8, sum(scores[-8:]) / 8
    print("reward first/last 8 updates", first, last, "max KL", max(kls))
    assert last > first + 0.05, scores
    assert all(math.isfinite(k) for k in kls) and max(kls) > 0


def run_fails(args, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    return " ".join(capsys.readouterr().err.split())


def test_negative_beta_is_refused(pipeline, capsys):
    args = ppo_args(
        str(pipeline / "sft1"), str(pipeline / "prompts.jsonl"), "--model.ppo.kl_coef=-0.1", reward=str(pipeline / "rm")
    )
    assert "kl_coef" in run_fails(args, capsys) or "β" in run_fails(args, capsys)


def test_anchor_with_another_tokenizer_is_refused(pipeline, tmp_path, capsys):
    from salsa_lightning.models.tiny import make_tiny_model, make_tiny_tokenizer

    tok = make_tiny_tokenizer(vocab_size=300)
    make_tiny_model(tok).save_pretrained(tmp_path / "other")
    tok.save_pretrained(tmp_path / "other")
    args = ppo_args(
        str(pipeline / "sft1"),
        str(pipeline / "prompts.jsonl"),
        f"--model.anchor=[{tmp_path / 'other'}]",
        reward=str(pipeline / "rm"),
    )
    assert "different tokenizer" in run_fails(args, capsys)


def test_soup_without_the_policy_seed_warns(pipeline, tmp_path):
    soup = tmp_path / "soup"
    shutil.copytree(pipeline / "sft2", soup)
    (soup / MANIFEST_NAME).write_text(json.dumps({"stage": "soup", "inputs": [{"path": str(pipeline / "sft2")}]}))
    with pytest.warns(UserWarning, match="not made from the policy's starting model"):
        run(pipeline, "--trainer.max_steps=1", "--model.anchor=soup", f"--model.soup={soup}")


def test_long_prompts_are_left_truncated_and_counted(tiny_tokenizer, tmp_path):
    from salsa_lightning.data.prompts import PromptDataModule

    rows = [{"prompt": "word " * 100 + "What is 2 + 3?"}, {"prompt": "What is 1 + 1?"}]
    dm = PromptDataModule(str(write_jsonl(tmp_path / "p.jsonl", rows)), tiny_tokenizer, max_prompt_length=24)
    with pytest.warns(UserWarning, match="longer than max_prompt_length"):
        dm.setup()
    assert dm.truncated == 1 and len(dm.rows[0]["input_ids"]) == 24
    assert tiny_tokenizer.decode(dm.rows[0]["input_ids"]).endswith("<|im_start|>assistant\n")


def test_nan_rewards_skip_updates_then_stop(pipeline, capsys):
    args = ppo_args(str(pipeline / "sft1"), str(pipeline / "prompts.jsonl"), "--trainer.max_epochs=5",
                    "--model.ppo.max_nonfinite_in_a_row=2", reward_fn="helpers:nan_reward")  # fmt: skip
    with pytest.warns(UserWarning, match="Skipped a PPO update"):
        msg = run_fails(args, capsys)
    assert "2 PPO updates in a row had NaN/inf" in msg


@pytest.mark.parametrize("layout", ["lora", "full"])
def test_in_memory_soup_equals_the_soup_stage_output(pipeline, layout):
    steps = ("--trainer.max_steps=4", "--model.optim.lr=1e-2", "--model.anchor=soup", f"--model.layout={layout}")
    from_stage = run(pipeline, *steps, f"--model.soup={pipeline / 'soup'}")
    in_memory = run(
        pipeline, *steps, f"--model.soup_inputs=[{pipeline / 'sft1'},{pipeline / 'sft2'}]", "--model.soup_alpha=0.5"
    )
    assert_same_curves(curves(from_stage), curves(in_memory), rel=1e-4)
    assert curves(from_stage)[0]["objective/kl_soup"] != 0  # (k1 is signed: a sampled batch's mean can be < 0)


def test_normalize_reward_uses_the_reward_stages_stats(pipeline):
    stats = json.loads((pipeline / "rm" / MANIFEST_NAME).read_text())["reward_stats"]
    raw = run(pipeline, "--trainer.max_steps=1")
    normed = run(pipeline, "--trainer.max_steps=1", "--model.ppo.normalize_reward=true")
    # the same first rollout (same seed): its mean score moves by exactly the stored affine map
    expected = (raw.model.history[0]["objective/scores"] - stats["mean"]) / stats["std"]
    assert normed.model.history[0]["objective/scores"] == pytest.approx(expected, rel=1e-4, abs=1e-5)


# ---------------------------------------------------------------- bugs a full read found (issue 12)
_calls = {"n": 0}


def nan_on_second_rollout(prompts: list, responses: list[str]) -> list[float]:
    """A finite reward except on the second rollout, which is all NaN (a skipped update)."""
    _calls["n"] += 1
    bad = _calls["n"] == 2
    return [float("nan") if bad else r.count("a") / max(len(r), 1) for r in responses]


def seeds_of_training_steps(monkeypatch) -> list[int]:
    import salsa_lightning.modules.ppo as ppo_module

    seeds: list[int] = []
    real = torch.manual_seed

    class Spy:
        def __getattr__(self, name):
            return getattr(torch, name)

        @staticmethod
        def manual_seed(seed):
            seeds.append(int(seed))
            return real(seed)

    monkeypatch.setattr(ppo_module, "torch", Spy())
    return seeds


def test_nan_loss_in_a_later_minibatch_is_a_partial_update_that_still_advances(pipeline, monkeypatch):
    import salsa_lightning.rl as rl_pkg

    seeds = seeds_of_training_steps(monkeypatch)
    real_loss, count = rl_pkg.policy_loss, {"n": 0}

    def nan_every_second_minibatch(*args, **kwargs):
        out = real_loss(*args, **kwargs)
        count["n"] += 1
        if count["n"] % 2 == 0:  # the second minibatch of every update (batch 8, minibatch 4, 2 epochs: 4 planned)
            out = type(out)(**{**out.__dict__, "loss": out.loss * float("nan")})
        return out

    monkeypatch.setattr(rl_pkg, "policy_loss", nan_every_second_minibatch)
    with pytest.warns(UserWarning, match="Cut a PPO update short: 1 of 4 minibatches ran"):
        cli = run(pipeline, "--trainer.max_epochs=1", "--model.optim.lr=1e-2", "--model.ppo.max_nonfinite_in_a_row=5")
    m = cli.model
    # the first minibatch of each update stepped the optimizer: each rollout counts as an update, honestly marked
    assert m.rollouts_done == m.updates_done == len(m.history) == 2
    assert all(h["train/nonfinite_minibatches"] == 3.0 for h in m.history)
    assert len(set(seeds)) == len(seeds) == 2  # the second rollout does not repeat the first one's sampling seed
    assert m.lr_schedulers().last_epoch == 2  # the schedule advanced with every rollout
    assert m.history[1]["objective/kl"] > 0  # the partial update moved the policy


def test_skipped_rollouts_still_advance_the_seed_and_the_schedule(pipeline, capsys, monkeypatch):
    seeds = seeds_of_training_steps(monkeypatch)
    args = ppo_args(str(pipeline / "sft1"), str(pipeline / "prompts.jsonl"), "--trainer.max_epochs=3",
                    "--model.ppo.max_nonfinite_in_a_row=3", reward_fn="helpers:nan_reward")  # fmt: skip
    with pytest.warns(UserWarning, match="Skipped a PPO update"):
        run_fails(args, capsys)
    assert len(seeds) == 3 and len(set(seeds)) == 3  # a skipped update is never retried with the same noise


def test_a_skipped_update_is_not_fed_to_the_kl_hack_monitor_twice(pipeline, monkeypatch):
    from salsa_lightning.rl.monitor import KLHackMonitor

    fed: list[float] = []
    real_update = KLHackMonitor.update
    monkeypatch.setattr(
        KLHackMonitor, "update", lambda self, length: fed.append(float(length)) or real_update(self, length)
    )
    _calls["n"] = 0
    with pytest.warns(UserWarning, match="Skipped a PPO update"):
        cli = run(pipeline, "--trainer.max_epochs=2", "--model.layout=full", "--model.kl_hack.action=warn",
                  reward=False, reward_fn="test_ppo:nan_on_second_rollout")  # fmt: skip
    lengths = [h["response_length"] for h in cli.model.history]
    assert len(lengths) == 3 and cli.model.rollouts_done == 4
    assert fed == pytest.approx(lengths)  # one observation per update that ran, none for the skipped one


@pytest.mark.parametrize("limit", ["--trainer.max_steps=8", "--trainer.max_epochs=1"])
def test_the_lr_schedule_spans_the_run_whichever_limit_is_set(pipeline, limit):
    # 16 prompts in batches of 8, minibatch 4, 2 PPO epochs: 4 optimizer steps per rollout, so max_steps=8 is the
    # same 2 rollouts as one epoch
    cli = run(
        pipeline, limit, "--model.optim.lr=1e-3", "--model.optim.schedule=linear", "--model.optim.warmup_ratio=0.5"
    )
    sch = cli.model.lr_schedulers()
    assert len(cli.model.history) == 2 and cli.trainer.global_step == 8
    assert sch.last_epoch == 2 and sch.get_last_lr()[0] == pytest.approx(0.0)  # warm-up then decay, to the end


def test_kl_hack_errors_name_fields_that_exist(pipeline, capsys):
    for flag, field in (("--model.kl_hack.min_fraction=1.5", "model.kl_hack.min_fraction"),
                        ("--model.kl_hack.patience=0", "model.kl_hack.patience")):  # fmt: skip
        msg = run_fails(ppo_args(str(pipeline / "sft1"), str(pipeline / "prompts.jsonl"), flag,
                                 reward=str(pipeline / "rm")), capsys)  # fmt: skip
        assert field in msg and "min_length_fraction" not in msg and "reference_updates" not in msg


@pytest.mark.parametrize("layout", ["lora", "full"])
def test_bf16_mixed_trains_with_gradient_clipping(pipeline, layout):
    # the precision bf16 CPUs and GPUs train in: PPO clips every step (max_grad_norm), which Lightning's mixed
    # precision allows only with an optimiser that does not unscale gradients itself (not a fused one)
    cli = run(pipeline, "--trainer.max_epochs=1", "--trainer.limit_train_batches=1", "--model.optim.lr=1e-2",
              "--trainer.precision=bf16-mixed", f"--model.layout={layout}")  # fmt: skip
    assert cli.trainer.global_step > 0 and math.isfinite(cli.model.history[0]["loss/policy_avg"])
    assert cli.model.history[0]["objective/kl"] == 0 != cli.model.history[-1]["policy/approxkl_avg"]  # it stepped
    assert cli.trainer.optimizers[0].defaults["fused"] is None


# ---------------------------------------------------------------- critic-free estimators (issue 14)
@pytest.mark.parametrize("layout", ["lora", "full"])
@pytest.mark.parametrize("estimator,anchor", [("grpo", "soup"), ("rloo", "init"), ("reinforce_pp", "init")])
def test_critic_free_estimators_train_without_a_critic(pipeline, layout, estimator, anchor):
    cli = run(pipeline, "--trainer.max_epochs=1", "--trainer.limit_train_batches=2", "--model.optim.lr=1e-2",
              f"--model.layout={layout}", f"--model.ppo.advantage_estimator={estimator}", f"--model.anchor={anchor}",
              "--model.ppo.n_samples_per_prompt=2", f"--model.soup={pipeline / 'soup'}")  # fmt: skip
    stack = cli.model.stack
    assert not hasattr(stack, "value") and not hasattr(stack, "value_head")  # no value model is built at all
    assert not any(".value." in n for n, _ in stack.named_parameters())
    h = cli.model.history
    assert len(h) == 2 and all("loss/value_avg" not in row and "val/explained_variance" not in row for row in h)
    assert h[1]["objective/kl_init"] != 0  # the policy moved from its start (k1 is signed: any non-zero value)
    assert cli.trainer.global_step == 2 * 2 * 4  # 2 rollouts x 2 PPO epochs x (8 prompts x 2 samples / 4 per minibatch)
    assert cli.trainer.optimizers[0].defaults["fused"] is True  # the stages' AdamW (tests/test_optim.py)


@pytest.mark.parametrize("layout", ["lora", "full"])
@pytest.mark.parametrize("estimator", ["gae", "grpo", "rloo", "reinforce_pp"])
def test_each_estimators_loss_falls_on_its_rollout(pipeline, layout, estimator):
    from helpers import shorter_is_better

    from salsa_lightning.data.prompts import PromptDataModule
    from salsa_lightning.models.loading import load_tokenizer
    from salsa_lightning.ppo.anchors import plan_anchors
    from salsa_lightning.ppo.build import build_stack
    from salsa_lightning.ppo.config import GenerationSpec, PPOSpec
    from salsa_lightning.ppo.losses import minibatch_loss
    from salsa_lightning.ppo.rollout import RewardSource, collect_rollout

    torch.manual_seed(0)
    ppo = PPOSpec(
        advantage_estimator=estimator, n_samples_per_prompt=2, kl_in="loss" if estimator == "grpo" else "reward"
    )
    gen = GenerationSpec(max_new_tokens=8)
    tok = load_tokenizer(str(pipeline / "sft1"), padding_side="left")
    dm = PromptDataModule(str(pipeline / "prompts.jsonl"), tok, batch_size=4)
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    plan = plan_anchors(str(pipeline / "sft1"), "soup", soup=str(pipeline / "soup"))
    stack = build_stack(
        layout, ModelSpec(dtype="float32"), plan.policy_init, plan.paths, None, "copy", critic=ppo.critic
    )
    roll = collect_rollout(stack, batch, tok, gen, ppo, plan, RewardSource(reward_fn=shorter_is_better), 0.05)
    assert roll.ids.shape[0] == 8 and roll.advantages.abs().sum() > 0
    opt = torch.optim.Adam([p for p in stack.parameters() if p.requires_grad], lr=1e-3)
    rows = roll.rows(torch.arange(8))
    losses = []
    for _ in range(4):
        loss, stats = minibatch_loss(stack, rows, ppo, gen, roll.kl_coef)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert losses[-1] < losses[0], losses
    assert ("loss/kl_avg" in stats) == (estimator == "grpo") and ("loss/value_avg" in stats) == (estimator == "gae")


@pytest.mark.parametrize("layout", ["lora", "full"])
@pytest.mark.parametrize("kl_in", ["reward", "loss"])
def test_backpropagating_policy_and_critic_apart_gives_the_joint_gradients(pipeline, layout, kl_in):
    # the update back-propagates the policy's part, then the critic's (one graph alive at a time): the gradients
    # must be those of one backward through the summed loss, bit for bit
    from helpers import shorter_is_better

    from salsa_lightning.data.prompts import PromptDataModule
    from salsa_lightning.models.loading import load_tokenizer
    from salsa_lightning.ppo.anchors import plan_anchors
    from salsa_lightning.ppo.build import build_stack
    from salsa_lightning.ppo.config import GenerationSpec, PPOSpec
    from salsa_lightning.ppo.losses import minibatch_loss, minibatch_losses
    from salsa_lightning.ppo.rollout import RewardSource, collect_rollout

    torch.manual_seed(0)
    ppo, gen = PPOSpec(kl_in=kl_in), GenerationSpec(max_new_tokens=8)
    tok = load_tokenizer(str(pipeline / "sft1"), padding_side="left")
    dm = PromptDataModule(str(pipeline / "prompts.jsonl"), tok, batch_size=4)
    dm.setup()
    plan = plan_anchors(str(pipeline / "sft1"), "init")
    stack = build_stack(layout, ModelSpec(dtype="float32"), plan.policy_init, plan.paths, str(pipeline / "rm"), "copy")
    batch = next(iter(dm.train_dataloader()))
    roll = collect_rollout(stack, batch, tok, gen, ppo, plan, RewardSource(reward_fn=shorter_is_better), 0.05)
    rows = roll.rows(torch.arange(4))
    params = [p for p in stack.parameters() if p.requires_grad]

    def grads():
        out = [p.grad.clone() if p.grad is not None else None for p in params]
        stack.zero_grad(set_to_none=True)
        return out

    loss, joint_stats = minibatch_loss(stack, rows, ppo, gen, roll.kl_coef)
    loss.backward()
    joint = grads()
    for part, part_stats in minibatch_losses(stack, rows, ppo, gen, roll.kl_coef):  # backward before the next part
        part.backward()
        stats = part_stats
    apart = grads()
    assert any(g is not None and g.abs().sum() > 0 for g in joint)
    for a, b in zip(joint, apart, strict=True):
        assert (a is None and b is None) or torch.equal(a, b)
    assert stats.keys() == joint_stats.keys() and all(torch.equal(stats[k], joint_stats[k]) for k in stats)


@pytest.mark.parametrize("layout", ["lora", "full"])
def test_gradient_checkpointing_works_in_eval_mode_and_changes_no_number(pipeline, layout):
    # PPO keeps its models in eval mode, where transformers skips checkpointing unless the stack marks the layers
    common = ("--trainer.max_steps=4", f"--model.layout={layout}")
    plain = run(pipeline, *common)
    ckpt = run(pipeline, *common, "--model.model.gradient_checkpointing=true")
    assert_same_curves(curves(plain), curves(ckpt), rel=0)
    stack = ckpt.model.stack
    saved = {"n": 0}

    def pack(t):
        saved["n"] += 1
        return t

    ids = torch.randint(3, 50, (2, 12))
    mask, pos = torch.ones_like(ids), torch.arange(12).expand(2, 12)
    counts = []
    for on in (False, True):
        for m in stack.modules():
            if hasattr(m, "gradient_checkpointing") and isinstance(m.gradient_checkpointing, bool):
                m.gradient_checkpointing = on
        saved["n"] = 0
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            stack.logits("policy", ids, mask, pos).sum()
        counts.append(saved["n"])
    assert counts[1] < counts[0] / 3, counts  # only each layer's inputs are kept, not its activations


def test_kl_in_the_loss_takes_it_out_of_the_reward(pipeline):
    common = ("--trainer.max_steps=4", "--model.anchor=soup", f"--model.soup={pipeline / 'soup'}")
    in_reward = run(pipeline, *common).model.history[0]
    in_loss = run(pipeline, *common, "--model.ppo.kl_in=loss").model.history[0]
    assert in_reward["objective/non_score_reward"] != 0 and in_loss["objective/non_score_reward"] == 0
    assert in_loss["objective/kl"] == pytest.approx(in_reward["objective/kl"])  # same rollout, same KL measured
    assert "loss/kl_avg" in in_loss and "loss/kl_avg" not in in_reward


def test_a_reward_model_as_the_policy_is_refused(pipeline, capsys):
    # a reward stage output where the policy goes would "train" and write a policy from an untrained LM head
    args = ppo_args(str(pipeline / "rm"), str(pipeline / "prompts.jsonl"), reward=str(pipeline / "rm"))
    assert "`model.policy_init` is" in run_fails(args, capsys) and "a reward model" in run_fails(args, capsys)


def test_an_sft_output_as_the_reward_model_is_refused(pipeline, capsys):
    args = ppo_args(str(pipeline / "sft1"), str(pipeline / "prompts.jsonl"), reward=str(pipeline / "sft2"))
    assert "no trained reward head" in run_fails(args, capsys)


def test_export_of_a_ppo_checkpoint_gives_the_fit_end_policy(pipeline, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out, exported = tmp_path / "salsa", tmp_path / "exported"
    run(pipeline, "--trainer.max_epochs=1", "--model.optim.lr=1e-2", "--model.anchor=soup",
        f"--model.soup={pipeline / 'soup'}", f"--model.output_dir={out}", "--trainer.enable_checkpointing=true",
        f"--trainer.default_root_dir={tmp_path}")  # fmt: skip
    (ckpt,) = tmp_path.rglob("*.ckpt")
    cli_main(["export", f"--checkpoint={ckpt}", f"--output_dir={exported}"])
    fit_manifest, manifest = (json.loads((d / MANIFEST_NAME).read_text()) for d in (out, exported))
    assert manifest["stage"] == fit_manifest["stage"] == "salsa" and manifest["format"] == "lora"
    assert json.loads((exported / "history.json").read_text()) == json.loads((out / "history.json").read_text())
    assert manifest["kl_coef_final"] == fit_manifest["kl_coef_final"]
    base_path = json.loads((pipeline / "sft1" / "adapter_config.json").read_text())["base_model_name_or_path"]
    ids = torch.randint(3, 300, (2, 10))
    logits = []
    for d in (out, exported):  # plain peft, nothing of ours
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_path), d).eval()
        with torch.no_grad():
            logits.append(model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits)
    torch.testing.assert_close(logits[0], logits[1], atol=0, rtol=0)
    start = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_path), pipeline / "sft1").eval()
    with torch.no_grad():
        assert not torch.allclose(start(input_ids=ids).logits, logits[1])  # the trained policy, not its start


def test_sample_tables_reach_wandb_offline_and_tensorboard(pipeline, tmp_path, monkeypatch):
    """The real wandb package in offline mode writes a local run directory; the table files are read back."""
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    args = [a for a in ppo_args(str(pipeline / "sft1"), str(pipeline / "prompts.jsonl"), reward=str(pipeline / "rm"))
            if not a.startswith(("--trainer.logger", "--model.sample_table_every"))]  # fmt: skip
    run_args = [*args, "--trainer.max_epochs=1", "--model.sample_table_every=1"]
    cli_main([*run_args, "--trainer.logger=lightning.pytorch.loggers.WandbLogger", f"--trainer.logger.save_dir={tmp_path}",
              "--trainer.logger.offline=true", "--trainer.logger.project=salsa-test"])  # fmt: skip
    tables = sorted(tmp_path.rglob("samples_*.table.json"))
    assert len(tables) == 2  # one per update (2 rollouts of 8 prompts)
    table = json.loads(tables[0].read_text())
    assert table["columns"] == ["prompt", "response", "score", "kl"] and len(table["data"]) == 4
    assert all(isinstance(row[2], float) and isinstance(row[3], float) for row in table["data"])

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = tmp_path / "tb"
    cli_main(
        [*run_args, "--trainer.logger=lightning.pytorch.loggers.TensorBoardLogger", f"--trainer.logger.save_dir={tb}"]
    )
    (events,) = tb.rglob("events.out.tfevents.*")
    acc = EventAccumulator(str(events.parent), size_guidance={"tensors": 0})
    acc.Reload()
    texts = [t for tag in acc.Tags()["tensors"] if tag.startswith("samples") for t in acc.Tensors(tag)]
    assert len(texts) == 2 and "| prompt | response | score | kl |" in texts[0].tensor_proto.string_val[0].decode()


def one_for_the_first_prompt(prompts: list, responses: list[str]) -> list[float]:
    """Varies with the response for rows of the batch's first prompt only; every other prompt scores 0.5 whatever
    the response, so its group is uninformative."""
    first = prompts[0]
    return [len(r) / 100 if p == first else 0.5 for p, r in zip(prompts, responses)]


@pytest.mark.parametrize("layout", ["lora", "full"])
def test_filter_groups_trains_on_the_informative_groups_only(pipeline, layout):
    # 8 prompts x 2 samples a rollout, minibatch 4, 2 PPO epochs: unfiltered, 4 steps per epoch; filtered, only the
    # first prompt's 2 rows are informative: 1 minibatch per epoch
    args = ("--trainer.max_epochs=1", "--trainer.limit_train_batches=2", "--model.ppo.advantage_estimator=grpo",
            "--model.ppo.kl_in=loss", "--model.ppo.n_samples_per_prompt=2", f"--model.layout={layout}")  # fmt: skip
    cli = run(pipeline, *args, "--model.ppo.filter_groups=true", reward=False,
              reward_fn="test_ppo:one_for_the_first_prompt")  # fmt: skip
    h = cli.model.history
    assert [row["train/informative_fraction"] for row in h] == [pytest.approx(2 / 16)] * 2
    assert cli.trainer.global_step == 2 * 2 * 1  # 2 rollouts x 2 epochs x 1 minibatch of the 2 informative rows
    unfiltered = run(pipeline, *args, reward=False, reward_fn="test_ppo:one_for_the_first_prompt")
    assert (
        unfiltered.trainer.global_step == 2 * 2 * 4 and "train/informative_fraction" not in unfiltered.model.history[0]
    )


def test_filter_groups_with_no_informative_group_takes_no_step(pipeline):
    cli = run(pipeline, "--trainer.max_epochs=1", "--trainer.limit_train_batches=2", "--model.layout=lora",
              "--model.ppo.advantage_estimator=rloo", "--model.ppo.n_samples_per_prompt=2",
              "--model.ppo.filter_groups=true", reward=False, reward_fn="test_ppo:constant_reward")  # fmt: skip
    h = cli.model.history
    assert len(h) == 2 and cli.trainer.global_step == 0 and cli.model.updates_done == 2
    assert all(row["train/informative_fraction"] == 0 and "loss/policy_avg" not in row for row in h)
    assert h[1]["objective/kl_init"] == 0  # the policy never moved


def constant_reward(prompts: list, responses: list[str]) -> list[float]:
    return [1.0] * len(responses)


def test_filter_groups_needs_a_group_estimator(pipeline, capsys):
    msg = run_fails(ppo_args(str(pipeline / "sft1"), str(pipeline / "prompts.jsonl"), "--model.ppo.filter_groups=true",
                             reward=str(pipeline / "rm")), capsys)  # fmt: skip
    assert "model.ppo.filter_groups" in msg and "grpo or rloo" in msg
