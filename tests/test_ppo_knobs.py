"""Issue 16's "do less work per update" options, each off by default: log-probs from the generation's own logits
(`ppo.rollout_logprobs`), the logging-only anchors measured every N-th rollout (`ppo.logged_kl_every`), and the
policy adapter merged for generation (`generation.merge_lora`). Each either changes no number of the update or
changes it only by float rounding, and each does skip the work it says it skips."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch
from helpers import shorter_is_better
from safetensors.torch import load_file, save_file
from test_ppo import assert_same_curves, curves, run, run_fails

from salsa_lightning.errors import SalsaError
from salsa_lightning.models.loading import ModelSpec, load_tokenizer
from salsa_lightning.ppo.anchors import plan_anchors
from salsa_lightning.ppo.build import build_stack
from salsa_lightning.ppo.config import GenerationSpec, PPOSpec
from salsa_lightning.ppo.losses import minibatch_loss
from salsa_lightning.ppo.merge import MergedAdapter
from salsa_lightning.ppo.rollout import RewardSource, collect_rollout
from salsa_lightning.rl.sequences import position_ids_from_mask

FP32 = ModelSpec(dtype="float32")


@pytest.fixture
def pipeline(ppo_pipeline):
    return ppo_pipeline


@pytest.fixture
def prompts(pipeline):
    """(tokenizer, one left-padded batch of 4 prompts)."""
    from salsa_lightning.data.prompts import PromptDataModule

    tok = load_tokenizer(str(pipeline / "sft1"), padding_side="left")
    dm = PromptDataModule(str(pipeline / "prompts.jsonl"), tok, batch_size=4)
    dm.setup()
    return tok, next(iter(dm.train_dataloader()))


def counted(stack, monkeypatch) -> Counter:
    """Counts `stack.logits` calls by model name (policy or anchor)."""
    calls: Counter = Counter()
    real = stack.logits

    def spy(name, *args, **kwargs):
        calls[name] += 1
        return real(name, *args, **kwargs)

    monkeypatch.setattr(stack, "logits", spy)
    return calls


class WithEOS:
    """The tokenizer with another token id as EOS: one the tiny model samples early in a response, so that responses
    end early and the padding after EOS is exercised (its real EOS is one of 384 tokens, rarely drawn in 8)."""

    def __init__(self, tokenizer, eos_token_id: int):
        self.tokenizer, self.eos_token_id = tokenizer, eos_token_id

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)


def collector(stack, prompts, plan, gen=None, tok=None):
    tok, batch = (tok or prompts[0]), prompts[1]
    gen = gen or GenerationSpec(max_new_tokens=8)

    def collect(ppo: PPOSpec, index: int = 0, seed: int = 0):
        torch.manual_seed(seed)  # the same sampling noise for every option
        return collect_rollout(
            stack, batch, tok, gen, ppo, plan, RewardSource(reward_fn=shorter_is_better), 0.05, index
        )

    return collect


# ---------------------------------------------------------------- ppo.rollout_logprobs
@pytest.mark.parametrize("layout", ["lora", "full"])
def test_rollout_logprobs_match_the_recomputed_ones_without_the_policy_forward(pipeline, prompts, layout, monkeypatch):
    plan = plan_anchors(str(pipeline / "sft1"), "init")
    stack = build_stack(layout, FP32, plan.policy_init, plan.paths, None, "copy")
    third = collector(stack, prompts, plan)(PPOSpec()).response[0, 2]  # the same noise: row 0 then ends by its 3rd
    calls = counted(stack, monkeypatch)
    collect = collector(stack, prompts, plan, tok=WithEOS(prompts[0], int(third)))

    ref = collect(PPOSpec())
    assert calls["policy"] == 1 and "rollout/logprob_diff" not in ref.metrics
    calls.clear()
    fast = collect(PPOSpec(rollout_logprobs=True, logprob_check_every=0))
    assert calls["policy"] == 0 and calls["init"] == 1  # the policy forward is skipped, the anchor's is not
    real = ref.resp_mask
    assert torch.equal(fast.response, ref.response) and torch.equal(fast.resp_mask, real)  # the same samples
    assert 0 < real.sum() < real.numel()  # some responses ended early: padding is exercised
    torch.testing.assert_close(fast.logp[real], ref.logp[real], rtol=0, atol=1e-5)  # KV-cache rounding only
    for k in ("objective/entropy", "objective/kl", "objective/kl_init", "objective/scores"):
        torch.testing.assert_close(fast.metrics[k], ref.metrics[k], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(fast.advantages, ref.advantages, rtol=1e-4, atol=1e-4)

    # the drift check runs the forward it saves, on the 1st, 11th, ... rollout only
    calls.clear()
    checked = collect(PPOSpec(rollout_logprobs=True), index=0)
    assert calls["policy"] == 1
    diff = checked.metrics["rollout/logprob_diff"]
    assert diff == pytest.approx(float((checked.logp - ref.logp).abs()[real].mean()), abs=1e-7) and diff < 1e-5
    torch.testing.assert_close(checked.logp, fast.logp, rtol=0, atol=0)  # the check never replaces the log-probs
    calls.clear()
    assert "rollout/logprob_diff" not in collect(PPOSpec(rollout_logprobs=True), index=1).metrics
    assert calls["policy"] == 0
    assert "rollout/logprob_diff" in collect(PPOSpec(rollout_logprobs=True), index=10).metrics


def test_rollout_logprobs_train_like_the_recomputed_ones(pipeline):
    common = ("--trainer.max_steps=8", "--model.optim.lr=1e-2")
    ref = curves(run(pipeline, *common))
    fast = curves(run(pipeline, *common, "--model.ppo.rollout_logprobs=true", "--model.ppo.logprob_check_every=1"))
    assert all(0 <= h.pop("rollout/logprob_diff") < 1e-5 for h in fast)
    assert_same_curves(ref, fast, rel=1e-3)


# ---------------------------------------------------------------- ppo.logged_kl_every
@pytest.mark.parametrize("anchor,logged_only", [("init", "soup"), ("soup", "init")])
def test_logging_only_anchors_run_every_nth_rollout_and_change_no_number(pipeline, prompts, anchor, logged_only,
                                                                         monkeypatch):  # fmt: skip
    plan = plan_anchors(str(pipeline / "sft1"), anchor, soup=str(pipeline / "soup"))
    assert plan.names == (anchor,) and set(plan.logged) == {"init", "soup"}
    stack = build_stack("lora", FP32, plan.policy_init, plan.paths, None, "copy")
    calls = counted(stack, monkeypatch)
    collect = collector(stack, prompts, plan)
    ppo, every2 = PPOSpec(), PPOSpec(logged_kl_every=2)
    for index in range(4):  # rollouts 1-4: the logging-only anchor on rollouts 1 and 3
        calls.clear()
        a, b = collect(ppo, index, seed=index), collect(every2, index, seed=index)
        assert calls[anchor] == 2 and calls[logged_only] == 1 + (index % 2 == 0)
        key = f"objective/kl_{logged_only}"
        assert (key in b.metrics) == (index % 2 == 0)  # absent in between: not zero, not stale
        assert b.metrics.keys() | {key} == a.metrics.keys()
        for k in b.metrics:
            assert torch.equal(a.metrics[k], b.metrics[k]), k
        for name in ("logp", "anchor_logp", "advantages", "returns", "values", "scores", "response_kl"):
            assert torch.equal(getattr(a, name), getattr(b, name)), name
        rows = torch.arange(4)
        (loss_a, stats_a), (loss_b, stats_b) = (minibatch_loss(stack, r.rows(rows), ppo, GenerationSpec(), 0.05)
                                                for r in (a, b))  # fmt: skip
        assert torch.equal(loss_a, loss_b) and all(torch.equal(stats_a[k], stats_b[k]) for k in stats_a)


def test_logged_kl_every_counts_rollouts_through_the_module(pipeline):
    common = ("--trainer.max_epochs=2", "--model.optim.lr=1e-2", f"--model.soup={pipeline / 'soup'}")  # 4 rollouts
    every1 = curves(run(pipeline, *common))
    every2 = curves(run(pipeline, *common, "--model.ppo.logged_kl_every=2"))
    assert [("objective/kl_soup" in h) for h in every2] == [True, False, True, False]
    for i in (1, 3):
        every1[i].pop("objective/kl_soup")
    assert_same_curves(every1, every2, rel=0)  # the update never reads the logging-only KL


def test_resume_measures_the_same_rollouts_as_an_uninterrupted_run(pipeline, tmp_path):
    # the every-N options count rollouts (checkpointed), so a run killed after rollout 1 and resumed measures on
    # rollout 3 again, not on its own 1st
    common = ("--model.optim.lr=1e-2", "--trainer.enable_checkpointing=true", "--trainer.limit_train_batches=1",
              "--trainer.max_epochs=3", f"--model.soup={pipeline / 'soup'}", "--model.ppo.logged_kl_every=2",
              "--model.ppo.rollout_logprobs=true", "--model.ppo.logprob_check_every=2")  # fmt: skip
    whole = run(pipeline, *common, f"--trainer.default_root_dir={tmp_path / 'a'}")
    run(pipeline, *common, f"--trainer.default_root_dir={tmp_path / 'b'}", "--trainer.callbacks+=helpers.KillAfterEpochs",
        "--trainer.callbacks.epochs=1")  # fmt: skip
    ckpt = next((tmp_path / "b").rglob("*.ckpt"))
    resumed = run(pipeline, *common, f"--trainer.default_root_dir={tmp_path / 'c'}", f"--ckpt_path={ckpt}")
    measured = [("objective/kl_soup" in h, "rollout/logprob_diff" in h) for h in curves(resumed)]
    assert measured == [(True, True), (False, False), (True, True)]
    assert_same_curves(curves(whole), curves(resumed))


# ---------------------------------------------------------------- generation.merge_lora
@pytest.mark.parametrize("restore", ["copy", "checkpoint"])
def test_merged_generation_samples_alike_and_leaves_the_base_bit_identical(pipeline, prompts, restore):
    """Either way of putting the base back (`generation.merge_restore`) leaves every model's outputs exactly as they
    were; `checkpoint` merges into the base's own storage (no copy) and reads it back from the checkpoint."""
    tok, batch = prompts
    anchors = {"init": str(pipeline / "sft1"), "soup": str(pipeline / "soup")}
    stack = build_stack("lora", FP32, str(pipeline / "sft1"), anchors, str(pipeline / "rm"), "copy", merge_lora=True,
                        merge_restore=restore)  # fmt: skip
    frozen = {n: p.detach().clone() for n, p in stack.named_parameters() if not p.requires_grad}
    ids, mask = batch["input_ids"], batch["attention_mask"]
    pos = position_ids_from_mask(mask)

    def outputs() -> dict[str, torch.Tensor]:
        with torch.no_grad():
            out = {n: stack.logits(n, ids, mask, pos) for n in ("policy", "init", "soup")}
            return {**out, "reward": stack.reward_scores(ids, mask), "value": stack.values(ids, mask, pos)}

    before = outputs()
    lora_a = next(m for n, m in stack.model.named_modules() if n.endswith("q_proj.lora_A.policy"))
    adapter_calls = Counter()
    lora_a.register_forward_hook(lambda *_: adapter_calls.update(["policy"]))

    def generate(merge: bool) -> tuple[torch.Tensor, int]:
        stack.merge_lora = merge
        adapter_calls.clear()
        with torch.no_grad():
            out = stack.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False,
                                 pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)  # fmt: skip
        return out, adapter_calls["policy"]

    (plain, plain_calls), (merged, merged_calls) = generate(False), generate(True)
    assert plain_calls > 0 and merged_calls == 0  # merged: the adapter's matmuls do not run while decoding
    assert torch.equal(plain, merged)  # greedy: the same tokens
    for n, p in stack.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, frozen[n]), n  # the base (and every frozen adapter) bit for bit
    after = outputs()
    for k in before:
        assert torch.equal(before[k], after[k]), k  # policy, anchors, reward and critic exactly as before
    assert not any(getattr(m, "merged_adapters", []) for m in stack.model.modules())

    q_proj = next(m for n, m in stack.model.named_modules() if n.endswith("q_proj.base_layer"))
    original, storage = q_proj.weight.detach().clone(), q_proj.weight.data_ptr()
    seen = []

    def failing_generate(**kwargs):
        # the adapter is merged into the base meanwhile: into a copy, or into the base's own storage
        seen.append((not torch.equal(q_proj.weight, original), q_proj.weight.data_ptr() == storage))
        raise RuntimeError("out of memory")

    stack.model.generate = failing_generate  # a failed generation still puts the base back
    with pytest.raises(RuntimeError):
        stack.generate(input_ids=ids)
    assert seen == [(True, restore == "checkpoint")]
    assert q_proj.weight.data_ptr() == storage
    assert all(torch.equal(p, frozen[n]) for n, p in stack.named_parameters() if not p.requires_grad)


def test_merge_lora_trains_like_the_unmerged_policy(pipeline):
    common = ("--trainer.max_steps=8", "--model.optim.lr=1e-2", "--model.layout=lora")
    plain = curves(run(pipeline, *common))
    merged = curves(run(pipeline, *common, "--model.generation.merge_lora=true"))
    assert_same_curves(plain, merged, rel=1e-5)
    # merged into the base itself and read back from the checkpoint: the same merge, the same base after it
    reread = curves(run(pipeline, *common, "--model.generation.merge_lora=true",
                        "--model.generation.merge_restore=checkpoint"))  # fmt: skip
    assert_same_curves(merged, reread, rel=0)


def test_merge_lora_is_refused_where_there_is_nothing_to_merge(pipeline, capsys):
    from helpers import ppo_args

    args = ppo_args(str(pipeline / "sft1"), str(pipeline / "prompts.jsonl"), "--model.layout=full",
                    "--model.generation.merge_lora=true", reward=str(pipeline / "rm"))  # fmt: skip
    msg = run_fails(args, capsys)
    assert "`model.generation.merge_lora` must be false with `layout: full`" in msg
    from salsa_lightning.distributed import FSDPSpec

    with pytest.raises(SalsaError, match="FSDP"):  # before any model is built
        build_stack("lora", FP32, str(pipeline / "sft1"), {}, None, "copy", (None, FSDPSpec()), merge_lora=True)

    # a targeted base weight tied to another module (as an LM head with tied embeddings would be) would carry the
    # merge into that module too
    stack = build_stack("lora", FP32, str(pipeline / "sft1"), {}, None, "copy", merge_lora=True)
    layers = dict(stack.model.named_modules())
    first, second = (layers[f"base_model.model.model.layers.{i}.self_attn.q_proj"] for i in (0, 1))
    second.base_layer.weight = first.base_layer.weight
    with pytest.raises(SalsaError, match="tied to another module"):
        MergedAdapter(stack.model, "policy")

    with pytest.raises(SalsaError, match="`model.generation.merge_restore` must be copy unless `model.generation"):
        GenerationSpec(merge_restore="checkpoint")


def test_merge_restore_checkpoint_refuses_a_checkpoint_that_is_not_the_loaded_base(pipeline, tmp_path):
    """The read-back is checked once, when the stack is built: a base that differs from its checkpoint (changed after
    loading, or converted on load) or a base directory without safetensors is refused there, in one sentence."""
    stack = build_stack("lora", FP32, str(pipeline / "sft1"), {}, None, "copy", merge_lora=True)
    q_proj = next(m for n, m in stack.model.named_modules() if n.endswith("layers.1.self_attn.q_proj.base_layer"))
    with torch.no_grad():
        q_proj.weight[0, 0] += 1.0
    with pytest.raises(SalsaError, match=r"its model.layers.1.self_attn.q_proj.weight differs from the loaded weight"):
        MergedAdapter(stack.model, "policy", "checkpoint", stack.base_path)
    with pytest.raises(SalsaError, match="holds no full-weight safetensors checkpoint; use `merge_restore: copy`"):
        (tmp_path / "config.json").write_text("{}")  # a model directory without safetensors weights
        MergedAdapter(stack.model, "policy", "checkpoint", str(tmp_path))
    with pytest.raises(SalsaError, match="not a local directory, an embedded model or a Hub model in the local cache"):
        MergedAdapter(stack.model, "policy", "checkpoint", "nobody/no-such-model")  # nothing is downloaded
    with pytest.raises(SalsaError, match="holds no tensor model.layers.0.self_attn.q_proj.weight"):
        renamed = tmp_path / "renamed"  # a checkpoint whose keys the loaded model does not use (a key rename)
        renamed.mkdir()
        (renamed / "config.json").write_text("{}")
        weights = load_file(str(Path(stack.base_path) / "model.safetensors"))
        save_file({f"renamed.{k}": v for k, v in weights.items()}, str(renamed / "model.safetensors"))
        MergedAdapter(stack.model, "policy", "checkpoint", str(renamed))


def test_merge_restore_checkpoint_reads_through_a_cpu_buffer_and_refuses_a_changed_checkpoint(pipeline, tmp_path):
    """Lightning builds the stack under its root device's context: the read buffer stays on the CPU (a GPU buffer
    could not take a file read). And a base checkpoint rewritten during the run is refused before the next merge,
    with the base untouched, rather than read back into it."""
    import shutil

    stack = build_stack("lora", FP32, str(pipeline / "sft1"), {}, None, "copy", merge_lora=True)
    base = tmp_path / "base"
    shutil.copytree(stack.base_path, base)
    with torch.device("meta"):
        merged = MergedAdapter(stack.model, "policy", "checkpoint", str(base))
    assert merged._buffer.device.type == "cpu" and merged._buffer.numel() > 0
    frozen = {n: p.detach().clone() for n, p in stack.named_parameters() if not p.requires_grad}
    with merged():
        pass
    assert all(torch.equal(p, frozen[n]) for n, p in stack.named_parameters() if not p.requires_grad)
    weights = load_file(str(base / "model.safetensors"))
    save_file(weights, str(base / "model.safetensors"))  # the same tensors, a new file
    with pytest.raises(SalsaError, match="changed during the run"), merged():
        pass
    assert all(torch.equal(p, frozen[n]) for n, p in stack.named_parameters() if not p.requires_grad)


def test_same_bits_tells_signed_zeros_apart_and_nans_alike():
    from salsa_lightning.ppo.merge import same_bits

    a = torch.tensor([0.0, float("nan"), 1.5], dtype=torch.bfloat16)
    assert same_bits(a, a.clone())
    assert not same_bits(a, torch.tensor([-0.0, float("nan"), 1.5], dtype=torch.bfloat16))
    assert not same_bits(a, a.float())


# ---------------------------------------------------------------- ppo.frozen_bf16
@pytest.mark.parametrize("layout", ["lora", "full"])
def test_frozen_bf16_autocasts_only_the_forwards_nothing_differentiates(pipeline, prompts, layout, monkeypatch):
    plan = plan_anchors(str(pipeline / "sft1"), "soup", soup=str(pipeline / "soup"))
    stack = build_stack(layout, FP32, plan.policy_init, plan.paths, str(pipeline / "rm"), "copy")
    autocast_by_model: dict[str, set[bool]] = {}
    for method in ("logits", "values", "reward_scores"):
        real = getattr(stack, method)

        def spy(*args, _real=real, _method=method, **kwargs):
            name = args[0] if _method == "logits" else _method
            autocast_by_model.setdefault(name, set()).add(torch.is_autocast_enabled("cpu"))
            return _real(*args, **kwargs)

        monkeypatch.setattr(stack, method, spy)
    tok, batch = prompts

    def collect(ppo: PPOSpec):
        torch.manual_seed(0)
        rewards = RewardSource(max_length=256)
        return collect_rollout(stack, batch, tok, GenerationSpec(max_new_tokens=8), ppo, plan, rewards, 0.05)

    exact, fast = collect(PPOSpec()), collect(PPOSpec(frozen_bf16=True))
    assert autocast_by_model == {"policy": {False}, "soup": {False, True}, "init": {False, True},
                                 "values": {False, True}, "reward_scores": {False, True}}  # fmt: skip
    assert torch.equal(exact.response, fast.response) and torch.equal(exact.logp, fast.logp)  # the policy's own: fp32
    for name in ("anchor_logp", "values", "raw_scores"):
        a, b = getattr(exact, name), getattr(fast, name)
        assert b.dtype == torch.float32 and not torch.equal(a, b), name  # bf16 rounding, returned as float32
        assert torch.allclose(a, b, atol=0.1, rtol=0.05), name


# ---------------------------------------------------------------- freed pages handed back inside the update
@pytest.mark.parametrize("layout", ["lora", "full"])
def test_freed_pages_are_handed_back_around_every_backward(pipeline, layout, monkeypatch):
    """Issue 16's profile: the policy part's freed graph stayed resident under the critic part's forward (peak RSS
    3194 -> 2840 MiB once trimmed), and the forward's freed temporaries under the log-softmax and the backward
    (LoRA + checkpointing, bf16: 1401 -> 1343 MiB). Each backward is preceded and followed by a trim, each log-prob
    forward is followed by one, and the trims change no number."""
    from lightning.pytorch import LightningModule

    import salsa_lightning.modules.ppo as ppo_module
    import salsa_lightning.ppo.rollout as rollout_module

    events: list[str] = []
    real_backward, real_logits = LightningModule.manual_backward, rollout_module.rl.logprobs_from_logits
    monkeypatch.setattr(ppo_module, "release_freed_memory", lambda: events.append("trim") or True)
    monkeypatch.setattr(rollout_module, "release_freed_memory", lambda: events.append("trim") or True)
    monkeypatch.setattr(rollout_module.rl, "logprobs_from_logits",
                        lambda *a, **k: (events.append("logprobs"), real_logits(*a, **k))[1])  # fmt: skip
    monkeypatch.setattr(
        LightningModule, "manual_backward", lambda self, loss, *a, **k: (events.append("backward"),
                                                                          real_backward(self, loss, *a, **k))[1]
    )  # fmt: skip
    args = ("--trainer.max_steps=4", f"--model.layout={layout}")
    trimmed = curves(run(pipeline, *args))
    backwards = events.count("backward")
    assert backwards == 4 * 2  # 4 minibatch steps, the policy part then the critic part
    assert all(i > 0 and events[i - 1] == "trim" == events[i + 1] for i, e in enumerate(events) if e == "backward")
    assert events.count("logprobs") > 0
    assert all(i > 0 and events[i - 1] == "trim" for i, e in enumerate(events) if e == "logprobs")
    monkeypatch.setattr(ppo_module, "release_freed_memory", lambda: True)
    monkeypatch.setattr(rollout_module, "release_freed_memory", lambda: True)
    assert_same_curves(trimmed, curves(run(pipeline, *args)))


# ---------------------------------------------------------------- bf16-mixed generation: weights cast once
@pytest.mark.parametrize("merge", [False, True])
def test_bf16_mixed_generation_casts_the_weights_once_and_samples_alike(pipeline, prompts, merge):
    """Under bf16 autocast (`trainer.precision: bf16-mixed`), the stack generates with bf16 copies of its Linear
    weights (merged first with `merge_lora`) and samples exactly the tokens of per-call casts; afterwards every
    weight is its float32 self again."""
    tok, batch = prompts
    stack = build_stack("lora", FP32, str(pipeline / "sft1"), {"init": str(pipeline / "sft1")}, None, "copy",
                        merge_lora=merge)  # fmt: skip
    before = {n: p.detach().clone() for n, p in stack.named_parameters()}
    q_proj = next(m for n, m in stack.model.named_modules() if n.endswith("q_proj.base_layer"))
    dtypes = []
    q_proj.register_forward_pre_hook(lambda m, _: dtypes.append(m.weight.dtype))
    kwargs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], max_new_tokens=10,
                  do_sample=True, top_k=0, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)  # fmt: skip

    def sample(generate):
        torch.manual_seed(3)
        with torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False):
            return generate(**kwargs)

    cast_once = sample(stack.generate)
    assert dtypes and set(dtypes) == {torch.bfloat16}
    if merge:
        with stack.merged_policy(), torch.no_grad():
            per_call = sample(stack.model.generate)
    else:
        with torch.no_grad():
            per_call = sample(stack.model.generate)  # the model's own generate: autocast casts at every call
    assert torch.float32 in dtypes[len(dtypes) // 2 :]  # (the per-call run saw float32 weights)
    assert torch.equal(cast_once, per_call)
    for n, p in stack.named_parameters():
        assert p.dtype == before[n].dtype and torch.equal(p, before[n]), n


# ---------------------------------------------------------------- ppo.base_linears_bf16
def test_base_linears_bf16_trains_like_the_float32_base_under_bf16_mixed(pipeline):
    """The LoRA layout's frozen Linear weights held in bf16 under bf16-mixed: every logged number of the run is the
    float32 base's (autocast cast those weights to the same bf16 values before every matmul)."""
    common = ("--trainer.max_steps=4", "--model.layout=lora", "--trainer.precision=bf16-mixed")
    plain = curves(run(pipeline, *common))
    held = run(pipeline, *common, "--model.ppo.base_linears_bf16=true")
    dtypes = {n: p.dtype for n, p in held.model.stack.named_parameters()}
    assert {d for n, d in dtypes.items() if ".base_layer." in n} == {torch.bfloat16}
    assert {d for n, d in dtypes.items() if "lora_" in n or "head" in n or "norm" in n} == {torch.float32}
    assert_same_curves(plain, curves(held), rel=0)


def test_a_merge_into_bf16_linears_is_read_back_from_the_float32_checkpoint(pipeline):
    """With the frozen Linears held in bf16, `merge_restore: checkpoint` casts the float32 checkpoint's weights back
    into them (the check at build time passes: the same rounding as the hold's), and the run is the copy's exactly."""
    common = ("--trainer.max_steps=4", "--model.layout=lora", "--trainer.precision=bf16-mixed",
              "--model.ppo.base_linears_bf16=true", "--model.generation.merge_lora=true")  # fmt: skip
    copied = run(pipeline, *common)
    reread = run(pipeline, *common, "--model.generation.merge_restore=checkpoint")
    assert reread.model.stack._merged.restore == "checkpoint"
    bases = [{n: p for n, p in m.model.stack.named_parameters() if ".base_layer." in n} for m in (copied, reread)]
    assert {p.dtype for p in bases[1].values()} == {torch.bfloat16}
    assert all(torch.equal(p, bases[1][n]) for n, p in bases[0].items())
    assert_same_curves(curves(copied), curves(reread), rel=0)


@pytest.mark.parametrize(("extra", "why"), [
    (("--trainer.precision=32-true", "--model.layout=lora"), "false unless `trainer.precision` is bf16-mixed"),
    (("--trainer.precision=bf16-mixed", "--model.layout=full"), "false with `layout: full`"),
])  # fmt: skip
def test_base_linears_bf16_is_refused_where_it_cannot_hold(pipeline, capsys, extra, why):
    from helpers import ppo_args

    args = ppo_args(str(pipeline / "sft1"), str(pipeline / "prompts.jsonl"), *extra,
                    "--model.ppo.base_linears_bf16=true", reward=str(pipeline / "rm"))  # fmt: skip
    assert f"`model.ppo.base_linears_bf16` must be {why}" in run_fails(args, capsys)


def test_a_stack_holding_bf16_linears_runs_its_forwards_in_autocast_when_the_caller_does_not(pipeline, prompts):
    """A callback outside the training step (no autocast) still gets the bf16-mixed numbers, not a dtype error."""
    tok, batch = prompts
    stack = build_stack("lora", FP32, str(pipeline / "sft1"), {"init": str(pipeline / "sft1")}, str(pipeline / "rm"),
                        "copy", base_linears_bf16=True)  # fmt: skip
    ids, mask = batch["input_ids"], batch["attention_mask"]
    pos = position_ids_from_mask(mask)

    def forwards():
        with torch.no_grad():
            torch.manual_seed(3)
            tokens = stack.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=True, top_k=0,
                                    pad_token_id=tok.pad_token_id)  # fmt: skip
            return (
                tokens,
                stack.logits("init", ids, mask, pos),
                stack.reward_scores(ids, mask),
                stack.values(ids, mask, pos),
            )

    outside = forwards()
    with torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False):
        inside = forwards()
    for a, b in zip(outside, inside, strict=True):
        assert torch.equal(a, b)
