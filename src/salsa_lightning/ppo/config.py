"""PPO's settings: one dataclass per concern, each checking its own fields once, where the config is parsed.

The pure `rl/` functions then assume valid arguments and do not re-check them on every call. A bad value is
one sentence naming the field as the user writes it (`--model.ppo.kl_coef`) and a value that works.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from salsa_lightning.errors import require as _check
from salsa_lightning.vllm_engine import Backend, VllmSpec


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


@dataclass
class GenerationSpec:
    """Sampling settings for rollouts (transformers `generate`)."""

    max_new_tokens: int = 64
    """Longest response; a response that reaches it without EOS can be penalised (`missing_eos_penalty`)."""
    temperature: float = 1.0
    """Sampling temperature; log-probs are computed at the same temperature."""
    top_k: int = 0
    """Top-k filter (0 = off)."""
    top_p: float = 1.0
    """Nucleus filter (1.0 = off)."""
    do_sample: bool = True
    """False = greedy rollouts (deterministic; for debugging and for comparing runs, not for training)."""
    min_new_tokens: int = 0
    """EOS is suppressed until a response has this many tokens (0 = off)."""
    merge_lora: bool = False
    """LoRA layout: fold the policy adapter into the base weights for `generate` and put the base back afterwards, so
    each decoding step runs plain matmuls instead of base + adapter (saves the adapters' extra matmuls at every token;
    the update, the anchors, the reward and the critic still run unmerged). Every other adapter's forward then reads
    the same base bit for bit (subtracting the adapter again would not restore it exactly; `merge_restore` says how it
    comes back). Numbers: the sampled tokens come from `(W + s·BA)x` instead of `Wx + s·B(Ax)`, equal up to float
    rounding. Refused with a 4-bit (QLoRA) base, under FSDP sharding and in the full layout (nothing to merge)."""
    merge_restore: Literal["copy", "checkpoint"] = "copy"
    """With `merge_lora`, how the base comes back after `generate`. `copy`: the merge writes into a copy of each
    targeted base weight and the untouched originals are swapped back; memory: one more copy of those weights (for
    `all-linear`, nearly the whole decoder) while generation runs. `checkpoint`: the merge writes into the base itself,
    which is then read back from the base model's safetensors checkpoint (cast as the load cast it; compared bit for
    bit with the loaded weights once, when the stack is built); no copy of the weights, one read of them per rollout,
    and a CPU buffer the size of the largest one."""
    backend: Backend = "hf"
    """`hf`: transformers' `generate` on the training model. `vllm`: a vLLM engine in this process, created once per
    run; the LoRA layout hands it the policy adapter each rollout (the base is loaded once), the full layout loads the
    policy's weights into it. The trainer recomputes the log-probs it trains on and logs `rollout/logprob_diff` (the
    gap to vLLM's) every rollout. One process only (FSDP / multi-process runs: `hf`); needs `make install VLLM=1`."""
    vllm: VllmSpec = field(default_factory=VllmSpec)
    """The vLLM engine's settings (`backend: vllm` only)."""

    def __post_init__(self) -> None:
        f = "model.generation."
        _check(self.max_new_tokens >= 1, f + "max_new_tokens", self.max_new_tokens, "at least 1", 64)
        _check(_finite(self.temperature) and self.temperature > 0, f + "temperature", self.temperature, "> 0", 1.0)
        _check(self.top_k >= 0, f + "top_k", self.top_k, ">= 0 (0 = off)", 0)
        _check(_finite(self.top_p) and 0 < self.top_p <= 1, f + "top_p", self.top_p, "in (0, 1]", 1.0)
        _check(
            0 <= self.min_new_tokens <= self.max_new_tokens,
            f + "min_new_tokens",
            self.min_new_tokens,
            f"between 0 and max_new_tokens ({self.max_new_tokens})",
            0,
        )
        _check(self.merge_restore in ("copy", "checkpoint"), f + "merge_restore", self.merge_restore,
               "copy or checkpoint", "copy")  # fmt: skip
        _check(self.merge_lora or self.merge_restore == "copy", f + "merge_restore", self.merge_restore,
               f"copy unless `{f}merge_lora` is true, as nothing is merged to put back", "copy")  # fmt: skip

    def sampling_kwargs(self) -> dict:
        """`generate` keyword arguments for this spec's sampling (greedy ignores the filters)."""
        if not self.do_sample:
            return {"do_sample": False}
        return {"do_sample": True, "temperature": self.temperature, "top_k": self.top_k or None, "top_p": self.top_p}


@dataclass
class PPOSpec:
    """PPO hyper-parameters (TRL's names where they exist)."""

    ppo_epochs: int = 2
    """Passes over each rollout batch (paper A.3: 2)."""
    mini_batch_size: int = 4
    """Rows per clipped update."""
    cliprange: float = 0.2
    """Policy ratio clip ε."""
    cliprange_value: float = 0.2
    """Value clip ε_v."""
    vf_coef: float = 0.1
    """Weight of the value loss."""
    gamma: float = 1.0
    """Discount."""
    lam: float = 0.95
    """GAE λ."""
    whiten_advantages: bool = True
    """Whiten advantages over real tokens."""
    kl_coef: float = 0.05
    """Initial β (paper A.3: 0.2 for PPO, 0.01 for SALSA)."""
    kl_estimator: Literal["k1", "k2", "k3"] = "k1"
    """Per-token KL estimate in the reward."""
    kl_target: float | None = None
    """Adaptive β toward this KL per response (Ziegler et al.); None = fixed β."""
    kl_horizon: int = 10000
    """Adaptive controller horizon."""
    missing_eos_penalty: float | None = None
    """Subtracted from the score of a response with no EOS (None = off)."""
    normalize_reward: bool = False
    """Normalise scores with the reward stage's training-set mean/std."""
    max_grad_norm: float = 1.0
    """Gradient clipping."""
    max_nonfinite_in_a_row: int = 3
    """Stop after this many consecutive updates with NaN/inf (skipped or cut short)."""
    advantage_estimator: Literal["gae", "grpo", "rloo", "reinforce_pp"] = "gae"
    """`gae`: PPO with a critic. Critic-free (no value model is built): `grpo` (group-normalised sequence rewards),
    `rloo` (leave-one-out baseline), `reinforce_pp` (REINFORCE++: token returns whitened over the batch).
    Every anchor (init, soup, MKL) works with every estimator."""
    n_samples_per_prompt: int = 1
    """Responses sampled per prompt (the group of `grpo`/`rloo`, which need at least 2); a batch of P prompts is
    P × n rollout rows."""
    scale_rewards: bool = True
    """`grpo`: divide by the group's std (False = Dr. GRPO: centre only)."""
    filter_groups: bool = False
    """`grpo`/`rloo`: leave out of the update the groups whose responses all got the same score (DAPO's dynamic
    sampling, without its re-sampling). Their advantages are 0, so with `kl_in: loss` they carry only the KL term;
    the update then costs time in proportion to the informative rows only. Logged: `train/informative_fraction`."""
    kl_in: Literal["reward", "loss"] = "reward"
    """Where the KL penalty to the anchor enters: per token in the reward (PPO, paper eq. 2/4), or as
    `kl_coef · mean(k3)` in the loss (GRPO's form)."""
    rollout_logprobs: bool = False
    """Take the "old" log-probs (and `objective/entropy`) from the logits `generate` computed while sampling, at the
    sampling temperature, instead of a separate policy forward after generation (TRL does this): saves one policy
    forward over every rollout. Numbers: decoding with a KV cache does not round exactly like one forward over the
    whole sequence (~1e-6 in float32, more in bf16), so the first minibatch's ratios, and the KL to an anchor equal to
    the policy, start that far from 1 and 0; see `logprob_check_every`."""
    logprob_check_every: int = 10
    """With `rollout_logprobs`: on every N-th rollout (the 1st, 1+N-th, ...) also run the policy forward it saves and
    log `rollout/logprob_diff`, the mean absolute difference over real tokens between the generation's log-probs and
    the recomputed ones (0 = never; ignored without `rollout_logprobs`). The default measures the drift at a tenth
    of the cost saved."""
    logged_kl_every: int = 1
    """Run the forward of the anchors that only feed logging (those measured but not in the penalty: the soup when
    `anchor: init`, `init` when `anchor: soup`) on every N-th rollout only (the 1st, 1+N-th, ...; counted in
    rollouts, so a resumed run measures the same ones). In between their `objective/kl_<name>` is absent from the
    logs, not zero. Saves (N-1)/N of those forwards; the update's numbers are the same for every N."""
    frozen_bf16: bool = False
    """Run the rollout's forwards that nothing differentiates — the anchors' log-probs, the reward model and the
    critic's "old" values — under bf16 autocast, on hardware that computes bf16 fast (GPUs; CPUs with AVX512-BF16 or
    AMX: `python -m salsa_lightning.hardware` says which). The policy's own log-probs and everything the update
    differentiates keep the trainer's precision. Numbers: the KL penalty, the scores and the value baseline carry
    bf16 rounding (off by default; a no-op under `trainer.precision: bf16-mixed`, which autocasts every forward)."""
    base_linears_bf16: bool = False
    """LoRA layout under `trainer.precision: bf16-mixed`: hold the frozen base's Linear weights in bf16 — what
    autocast casts them to before every matmul anyway — instead of float32; embeddings, norms, a tied LM head and
    every adapter keep float32. The matmuls read the same operands, so the numbers are the float32 base's (with
    `generation.merge_lora` the adapter is merged into the bf16 weight: one rounding more). Saves half the base's
    Linear memory and every forward's cast of it (measured in `benchmarks/vs_trl.py --precision bf16`). Refused
    with any other precision (a float32 forward would meet bf16 weights), the full layout, a 4-bit base, FSDP and
    the vLLM backend."""

    @property
    def critic(self) -> bool:
        """Whether the estimator needs a value model."""
        return self.advantage_estimator == "gae"

    def __post_init__(self) -> None:
        f = "model.ppo."
        _check(self.n_samples_per_prompt >= 1, f + "n_samples_per_prompt", self.n_samples_per_prompt, ">= 1", 4)
        if self.advantage_estimator in ("grpo", "rloo"):
            _check(
                self.n_samples_per_prompt >= 2,
                f + "n_samples_per_prompt",
                self.n_samples_per_prompt,
                f"at least 2 for `advantage_estimator: {self.advantage_estimator}` (it compares responses to one prompt)",
                4,
            )
        if self.filter_groups:
            _check(
                self.advantage_estimator in ("grpo", "rloo"),
                f + "filter_groups",
                self.filter_groups,
                "false unless `advantage_estimator` is grpo or rloo (it filters groups of responses to one prompt)",
                False,
            )
        _check(self.ppo_epochs >= 1, f + "ppo_epochs", self.ppo_epochs, "at least 1", 2)
        _check(self.mini_batch_size >= 1, f + "mini_batch_size", self.mini_batch_size, "at least 1", 4)
        for name, example in (("cliprange", 0.2), ("cliprange_value", 0.2)):
            value = getattr(self, name)
            _check(_finite(value) and value > 0, f + name, value, "> 0", example)
        _check(_finite(self.vf_coef) and self.vf_coef >= 0, f + "vf_coef", self.vf_coef, ">= 0", 0.1)
        for name, example in (("gamma", 1.0), ("lam", 0.95)):
            value = getattr(self, name)
            _check(_finite(value) and 0 <= value <= 1, f + name, value, "in [0, 1]", example)
        _check(
            _finite(self.kl_coef) and self.kl_coef >= 0, f + "kl_coef", self.kl_coef, ">= 0 (β; 0 = no KL penalty)", 0.2
        )
        if self.kl_target is not None:
            _check(_finite(self.kl_target) and self.kl_target > 0, f + "kl_target", self.kl_target, "> 0 or null", 6.0)
        _check(self.kl_horizon >= 1, f + "kl_horizon", self.kl_horizon, "at least 1", 10000)
        if self.missing_eos_penalty is not None:
            _check(
                _finite(self.missing_eos_penalty) and self.missing_eos_penalty >= 0,
                f + "missing_eos_penalty",
                self.missing_eos_penalty,
                ">= 0 (it is subtracted from the score) or null",
                1.0,
            )
        _check(
            _finite(self.max_grad_norm) and self.max_grad_norm > 0, f + "max_grad_norm", self.max_grad_norm, "> 0", 1.0
        )
        _check(self.max_nonfinite_in_a_row >= 1, f + "max_nonfinite_in_a_row", self.max_nonfinite_in_a_row, ">= 1", 3)
        _check(
            self.logprob_check_every >= 0, f + "logprob_check_every", self.logprob_check_every, ">= 0 (0 = never)", 10
        )
        _check(self.logged_kl_every >= 1, f + "logged_kl_every", self.logged_kl_every, "at least 1", 4)


def every(n: int, index: int) -> bool:
    """Whether the rollout `index` (0-based) is one of an every-`n` option's: the 1st, 1+n-th, ... (n = 0: never)."""
    return n > 0 and index % n == 0


def check_merge_lora(layout: str, quantized: bool, sharded: bool) -> None:
    """`generation.merge_lora` where it cannot work, refused in one sentence before any model loads. Not in
    `GenerationSpec.__post_init__`: the layout, the quantisation and the strategy are other settings."""
    f, why = "model.generation.merge_lora", None
    if layout != "lora":
        why = "false with `layout: full`, which holds no adapter to merge"
    elif quantized:
        why = "false with a 4-bit (QLoRA) base, whose packed weights cannot take the adapter exactly"
    elif sharded:
        why = "false under FSDP sharding, where no rank holds the whole weights to merge into"
    _check(why is None, f, True, why, False)


def check_base_linears_bf16(layout: str, precision: str, quantized: bool, sharded: bool, backend: str) -> None:
    """`ppo.base_linears_bf16` where it cannot work, refused in one sentence before any model loads."""
    f, why = "model.ppo.base_linears_bf16", None
    if layout != "lora":
        why = "false with `layout: full` (it holds the LoRA layout's frozen base in bf16)"
    elif precision != "bf16-mixed":
        why = (f"false unless `trainer.precision` is bf16-mixed (it is {precision}; only autocast gives the bf16 "
               "weights bf16 inputs)")  # fmt: skip
    elif quantized:
        why = "false with a 4-bit (QLoRA) base, which is already smaller than bf16"
    elif sharded:
        why = "false under FSDP sharding (it applies to one process's whole base)"
    elif backend != "hf":
        why = "false with `generation.backend: vllm`, which loads its own copy of the base"
    _check(why is None, f, True, why, False)


@dataclass
class KLHackSpec:
    """Paper §A.4: with a large β the policy can shrink responses toward zero length (zero KL)."""

    min_fraction: float = 0.25
    """Alarm when the mean response length falls below this fraction of its starting value."""
    action: Literal["warn", "stop", "off"] = "warn"
    """Warn, or stop training."""
    patience: int = 2
    """Consecutive updates below the threshold before the alarm."""

    def __post_init__(self) -> None:
        f = "model.kl_hack."
        _check(
            _finite(self.min_fraction) and 0 < self.min_fraction < 1,
            f + "min_fraction",
            self.min_fraction,
            "in (0, 1)",
            0.25,
        )
        _check(self.patience >= 1, f + "patience", self.patience, "at least 1", 2)


__all__ = ["GenerationSpec", "KLHackSpec", "PPOSpec", "check_base_linears_bf16", "check_merge_lora", "every"]
