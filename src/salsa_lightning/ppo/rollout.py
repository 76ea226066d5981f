"""One rollout: sample responses from the policy, score them, and compute everything the clipped updates train on.

`collect_rollout` is the first half of PPO's loop (CleanRL's "rollout phase"); it calls the pure `rl/` functions in
the order the `rl` package docstring lists them and returns a `Rollout`.
"""

from __future__ import annotations

import contextlib
import importlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from salsa_lightning import rl
from salsa_lightning.allocator import release_freed_memory
from salsa_lightning.distributed import mean_over_ranks, sum_over_ranks, world_size
from salsa_lightning.errors import SalsaError
from salsa_lightning.models.loading import canonical_model_ref, resolve_model_path
from salsa_lightning.ppo.anchors import AnchorPlan
from salsa_lightning.ppo.config import GenerationSpec, PPOSpec, every
from salsa_lightning.ppo.stack import POLICY, Stack
from salsa_lightning.reward.model import normalization_stats, reward_max_length
from salsa_lightning.reward.scoring import encode_for_reward

# metrics that are global statistics already (from reduced moments), or counts: not averaged over ranks
GLOBAL_METRICS = ("objective/scores_std", "val/explained_variance")
COUNT_METRICS = ("val/num_eos_tokens",)


@dataclass
class Rollout:
    """A rollout batch: B rows of `[prompt | response]`, R response positions. Tensors are (B, L) for the whole
    sequence and (B, R) for the response unless noted."""

    ids: torch.Tensor  # (B, L) prompt and response tokens
    mask: torch.Tensor  # (B, L) attention mask
    pos: torch.Tensor  # (B, L) position ids (left padding does not shift them)
    response: torch.Tensor  # (B, R) sampled tokens
    resp_mask: torch.Tensor  # (B, R) bool, real response tokens (up to and incl. the first EOS)
    logp: torch.Tensor  # (B, R) the policy's log-probs at sampling time (PPO's "old" log-probs)
    values: torch.Tensor  # (B, R) critic values at sampling time (0 without a critic)
    advantages: torch.Tensor  # (B, R)
    returns: torch.Tensor  # (B, R) value targets (0 without a critic)
    anchor_logp: torch.Tensor  # (J, B, R) the penalty anchors' log-probs (for the KL in the loss)
    response_kl: torch.Tensor  # (B,) each response's KL to the anchor (summed over its tokens)
    kl_coef: float  # β of this rollout
    scores: torch.Tensor  # (B,) scores put into the reward (after normalisation / missing-EOS penalty)
    raw_scores: torch.Tensor  # (B,) the reward's own scores
    texts: list[str]  # decoded responses
    messages: list  # the prompts, as message lists
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)  # global-batch statistics (TRL's names)
    timings: dict[str, float] = field(default_factory=dict)  # seconds per phase

    def rows(self, idx: torch.Tensor) -> dict[str, torch.Tensor]:
        """The minibatch `idx` of every tensor a clipped update reads (CleanRL's `mb_` tensors)."""
        names = ("ids", "mask", "pos", "response", "resp_mask", "logp", "values", "advantages", "returns")
        return {**{name: getattr(self, name)[idx] for name in names}, "anchor_logp": self.anchor_logp[:, idx]}

    def samples(self, n: int = 4) -> tuple[list[str], list[list]]:
        """(columns, rows) of the first `n` prompts, responses, raw scores and KLs: the sample table of a run."""
        columns = ["prompt", "response", "score", "kl"]
        rows = [
            [m[-1]["content"], t, round(float(s), 4), round(float(k), 4)]
            for m, t, s, k in zip(self.messages[:n], self.texts[:n], self.raw_scores[:n], self.response_kl[:n])
        ]
        return columns, rows

    def finite(self) -> bool:
        """Whether every statistic is finite (explained variance is NaN by definition for constant returns)."""
        return all(bool(torch.isfinite(v).all()) for k, v in self.metrics.items() if k != "val/explained_variance")


@dataclass(frozen=True)
class RewardSource:
    """Where scores come from: a programmatic `reward_fn`, or the stack's reward model on conversations encoded as
    the reward stage trained (left-truncated to `max_length`), optionally normalised with its training-set `stats`."""

    reward_fn: Callable[[list, list[str]], list[float]] | None = None
    max_length: int = 1024
    stats: dict | None = None
    model_ref: str | None = None  # the reward model as the manifest records it
    fn_ref: str | None = None  # the reward_fn as configured

    def describe(self) -> dict[str, str | None]:
        return {"reward_model": self.model_ref, "reward_fn": self.fn_ref}

    @classmethod
    def from_config(cls, reward_model: str | None, reward_fn: str | None, normalize: bool) -> RewardSource:
        """Read once at start-up, so a bad path or file fails before any model loads."""
        if (reward_model is None) == (reward_fn is None):
            raise SalsaError(
                "Set exactly one of `reward_model` (a reward stage output) and `reward_fn` (module:function)."
            )
        if reward_fn is not None:
            return cls(reward_fn=import_reward_fn(reward_fn), fn_ref=reward_fn)
        path = resolve_model_path(reward_model)
        stats = normalization_stats(path) if normalize else None
        return cls(max_length=reward_max_length(path), stats=stats, model_ref=canonical_model_ref(reward_model))

    def score(self, stack: Stack, tokenizer, messages: list, texts: list[str], device) -> torch.Tensor:
        if self.reward_fn is not None:
            return torch.tensor([float(x) for x in self.reward_fn(messages, texts)], device=device)
        ids, mask = encode_for_reward(tokenizer, messages, texts, self.max_length)
        scores = stack.reward_scores(ids.to(device), mask.to(device))
        if self.stats is not None:
            scores = rl.normalize_scores(scores, self.stats["mean"], self.stats["std"])
        return scores


def import_reward_fn(ref: str) -> Callable:
    """`package.module:function` -> the function, or one sentence saying what is wrong with `ref`."""
    module, _, name = ref.partition(":")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as err:
        raise SalsaError(f"Cannot import reward_fn {ref!r} ({err}); give it as `package.module:function`.") from err
    if not callable(fn):
        raise SalsaError(f"reward_fn {ref!r} is not callable; point it at a function.")
    return fn


def response_logprobs(stack: Stack, name: str, ids, mask, pos, response, temperature: float) -> torch.Tensor:
    """(B, R) log-probs of `response` under the policy or anchor `name` (only the response's logits computed)."""
    keep = response.shape[1] + 1  # the positions that predict the response (and one spare the slicing drops)
    logits = stack.logits(name, ids, mask, pos, keep)
    release_freed_memory()  # the forward's freed temporaries, before the log-softmax over the vocabulary allocates
    return rl.logprobs_from_logits(rl.response_logits(logits, response.shape[1]), response, temperature)


def frozen_precision(ppo: PPOSpec, device: torch.device):
    """bf16 autocast for the forwards nothing differentiates, with `ppo.frozen_bf16`; otherwise nothing."""
    if not ppo.frozen_bf16:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def repeat_prompts(batch: dict[str, Any], n: int) -> dict[str, Any]:
    """Each prompt row `n` times in a row (a group's rows contiguous, as the group estimators expect)."""
    if n == 1:
        return batch
    return {
        k: v.repeat_interleave(n, dim=0) if isinstance(v, torch.Tensor) else [x for x in v for _ in range(n)]
        for k, v in batch.items()
    }


def estimate_advantages(
    ppo: PPOSpec, rewards: torch.Tensor, values: torch.Tensor | None, mask: torch.Tensor, all_reduce=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages, returns), both (B, R), by `ppo.advantage_estimator` from per-token `rewards` (the score at the
    last real token plus any KL-in-reward term); critic-free estimators return zero returns."""
    if ppo.advantage_estimator == "gae":
        gae = rl.compute_gae(rewards, values, mask, ppo.gamma, ppo.lam, ppo.whiten_advantages, all_reduce)
        return gae.advantages, gae.returns
    if ppo.advantage_estimator == "reinforce_pp":
        advantages = rl.reinforce_pp_advantages(rewards, mask, ppo.gamma, all_reduce)
    else:
        sequence = rl.masked_sum(rewards, mask, dim=1)  # (B,) each response's total reward
        G = ppo.n_samples_per_prompt
        if ppo.advantage_estimator == "grpo":
            per_row = rl.group_advantages(sequence, G, scale_by_std=ppo.scale_rewards)
        else:
            per_row = rl.rloo_advantages(sequence, G)
        advantages = rl.broadcast_to_tokens(per_row, mask)
    return advantages, torch.zeros_like(advantages)


@torch.no_grad()
def collect_rollout(
    stack: Stack,
    batch: dict[str, Any],
    tokenizer,
    gen: GenerationSpec,
    ppo: PPOSpec,
    plan: AnchorPlan,
    rewards: RewardSource,
    kl_coef: float,
    index: int = 0,
    engine=None,
) -> Rollout:
    """Sample, score and measure one rollout batch. `index`: the 0-based number of this rollout in the run, which the
    every-N options (`ppo.logged_kl_every`, `ppo.logprob_check_every`) count, so a resumed run measures the same
    rollouts as an uninterrupted one. `engine`: a `VllmEngine` to sample with (`generation.backend: vllm`), which
    is handed the current policy first; None = the stack's own `generate`."""
    timings: dict[str, float] = {}
    extra: dict[str, torch.Tensor] = {}  # measurements taken on some rollouts only
    batch = repeat_prompts(batch, ppo.n_samples_per_prompt)
    prompt_ids, prompt_mask = batch["input_ids"], batch["attention_mask"]
    t0 = time.perf_counter()
    step_logits = engine_logp = None
    if engine is not None:  # vLLM: the policy handed over, then sampled there
        from salsa_lightning.ppo.vllm_rollout import engine_generate, hand_over_policy

        hand_over_policy(engine, stack)
        response, engine_logp = engine_generate(engine, prompt_ids, prompt_mask, gen, tokenizer)  # (B, R) each
    else:
        out = stack.generate(
            input_ids=prompt_ids,
            attention_mask=prompt_mask,
            max_new_tokens=gen.max_new_tokens,
            min_new_tokens=gen.min_new_tokens or None,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            # sharded: every rank must run every forward (each gathers layers from all), so ranks that finish
            # early keep stepping until the slowest one is done
            synced_gpus=world_size() > 1 and getattr(stack, "fsdp", None) is not None,
            # the raw logits of each sampling step: the "old" log-probs without a policy forward afterwards
            **({"output_logits": True, "return_dict_in_generate": True} if ppo.rollout_logprobs else {}),
            **gen.sampling_kwargs(),
        )
        if ppo.rollout_logprobs:
            out, step_logits = out.sequences, out.logits  # (B, P + R); R tensors (B, V), float32
        response = out[:, prompt_ids.shape[1] :]  # (B, R)
    timings["time/generate"] = time.perf_counter() - t0
    resp_mask = rl.response_mask(response, tokenizer.eos_token_id)  # (B, R) bool
    has_eos = rl.contains_eos(response, tokenizer.eos_token_id, resp_mask)  # (B,)

    t0 = time.perf_counter()
    texts = [tokenizer.decode(r[m], skip_special_tokens=True) for r, m in zip(response, resp_mask)]
    with frozen_precision(ppo, prompt_ids.device):
        raw_scores = rewards.score(stack, tokenizer, batch["messages"], texts, prompt_ids.device).float()  # (B,)
    timings["time/score"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    ids = torch.cat([prompt_ids, response], dim=1)  # (B, L)
    mask = torch.cat([prompt_mask, resp_mask.long()], dim=1)  # (B, L)
    pos = rl.position_ids_from_mask(mask)  # (B, L)
    T = gen.temperature
    if step_logits is not None:
        logp, entropy = rl.step_logprobs(step_logits, response, T)  # (B, R) each
        del step_logits
        if every(ppo.logprob_check_every, index):  # the drift from decoding with a KV cache, at the forward's cost
            recomputed = response_logprobs(stack, POLICY, ids, mask, pos, response, T)  # (B, R)
            extra["rollout/logprob_diff"] = rl.masked_mean((logp - recomputed).abs(), resp_mask)
    else:
        logits = stack.logits(POLICY, ids, mask, pos, response.shape[1] + 1)  # (B, R+1, V)
        release_freed_memory()  # as in `response_logprobs`
        logp = rl.logprobs_from_logits(rl.response_logits(logits, response.shape[1]), response, T)  # (B, R)
        entropy = rl.entropy_from_logits(rl.response_logits(logits, response.shape[1]), T)  # (B, R)
        del logits
        if engine_logp is not None:  # what vLLM sampled from vs what the trainer computes (veRL/OpenRLHF log it)
            extra["rollout/logprob_diff"] = rl.masked_mean((engine_logp - logp).abs(), resp_mask)
    # the penalty's anchors every rollout; those only logged (plan.logged, not plan.names) every logged_kl_every-th
    measured = [n for n in plan.paths if n in plan.names or every(ppo.logged_kl_every, index)]
    with frozen_precision(ppo, prompt_ids.device):  # nothing below is differentiated
        anchor_logp = {name: response_logprobs(stack, name, ids, mask, pos, response, T) for name in measured}
        values = rl.response_logits(stack.values(ids, mask, pos), response.shape[1]).float() if ppo.critic else None
    timings["time/forward"] = time.perf_counter() - t0

    refs = torch.stack([anchor_logp[n] for n in plan.names])  # (J, B, R)
    kl = (
        rl.kl_penalty(logp, refs[0], ppo.kl_estimator)
        if len(refs) == 1
        else rl.multi_anchor_kl(logp, refs, ppo.kl_estimator)
    )
    named_kls = {n: rl.kl_penalty(logp, anchor_logp[n], ppo.kl_estimator) for n in plan.logged if n in anchor_logp}
    scores = rl.apply_missing_eos_penalty(raw_scores, has_eos, ppo.missing_eos_penalty)
    shaped = rl.shape_rewards(scores, kl, resp_mask, kl_coef if ppo.kl_in == "reward" else 0.0)
    all_reduce = sum_over_ranks if world_size() > 1 else None
    advantages, returns = estimate_advantages(ppo, shaped.rewards, values, resp_mask, all_reduce)
    metrics = rl.rollout_metrics(scores, shaped, kl, resp_mask, has_eos, entropy, named_kls, all_reduce=all_reduce)
    if values is not None:
        metrics["val/explained_variance"] = rl.explained_variance(values, returns, resp_mask, all_reduce=all_reduce)
    metrics.update(extra)
    metrics = mean_over_ranks(metrics, counts=COUNT_METRICS, exact=GLOBAL_METRICS)
    return Rollout(
        ids=ids, mask=mask, pos=pos, response=response, resp_mask=resp_mask, logp=logp,
        values=values if values is not None else torch.zeros_like(logp), advantages=advantages, returns=returns,
        anchor_logp=refs, response_kl=rl.masked_sum(kl, resp_mask, dim=1), kl_coef=kl_coef, scores=scores, raw_scores=raw_scores, texts=texts,
        messages=batch["messages"], metrics=metrics, timings=timings,
    )  # fmt: skip


__all__ = [
    "Rollout",
    "RewardSource",
    "collect_rollout",
    "estimate_advantages",
    "import_reward_fn",
    "repeat_prompts",
    "response_logprobs",
]
