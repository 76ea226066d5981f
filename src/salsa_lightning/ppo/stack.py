"""Everything PPO runs a forward pass through — policy, anchors, reward model, critic — in two layouts.

- `FullStack`: the policy and the critic train as full-weight models; every anchor and the reward model
  are frozen copies (DESIGN §3, full-weight mode).
- `LoraStack`: ONE frozen base carries named adapters — `policy` (trainable), `init` (the SFT adapter it
  starts from), `soup`, any MKL anchors, `reward` and `value` — plus two small linear heads. Anchor
  log-probs come from switching the active adapter, not from a second model, so peak memory stays near
  one base model plus activations.

Both satisfy the `Stack` protocol, so the PPO module never asks which layout it runs on; `build_stack` is the one
way to make either, sharded or not.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Protocol

import torch

from salsa_lightning.distributed import FSDPSpec, gathered
from salsa_lightning.models.precision import linear_weights_cast_once
from salsa_lightning.reward.model import module_output, unwrap

POLICY = "policy"  # the name `Stack.logits` knows the trained policy by; every other name is an anchor


class Stack(Protocol):
    """Everything PPO runs a forward pass through. `ids`, `mask`, `pos`: (B, L) `[prompt | response]` tokens, their
    attention mask and position ids."""

    layout: str  # "full" or "lora": what the stage output holds

    def generate(self, **generate_kwargs) -> torch.Tensor:
        """The policy's `generate` (sharded: with its layers gathered for the whole call; LoRA layout with
        `merge_lora`: with the policy adapter merged into the base). Returns what transformers' `generate` returns:
        the sequences, or its output object with `return_dict_in_generate=True`."""

    def logits(self, name: str, ids, mask, pos, keep: int = 0) -> torch.Tensor:
        """(B, keep, V) logits of the policy (`name="policy"`) or of the anchor `name`, for the last `keep`
        positions (0 = all): PPO needs only the response's, and the prompt's vocabulary projection would be the
        largest tensor of the step."""

    def reward_scores(self, ids, mask) -> torch.Tensor:
        """(B,) reward at each row's last real token."""

    def values(self, ids, mask, pos) -> torch.Tensor:
        """(B, L) critic values at every position."""

    def gather_policy(self) -> dict[str, torch.Tensor] | None:
        """The policy's unsharded weights (a collective under FSDP: every rank calls it), or None unsharded."""

    def save_policy(self, directory: Path, state_dict: dict[str, torch.Tensor] | None) -> None:
        """Write the policy into `directory` as plain transformers/PEFT load it (full weights, or the adapter)."""


def _backbone(model):
    """The transformer trunk (no LM/score head) of a transformers model, through any PEFT wrapper."""
    inner = unwrap(model)
    return getattr(inner, inner.base_model_prefix)


def _hidden(model, ids, mask, pos) -> torch.Tensor:
    """The trunk's last hidden state (B, T, H); `logits_to_keep=1` skips the vocabulary projection of all but one
    position."""
    return module_output(model, _backbone(model), ids, mask, pos, logits_to_keep=1)[0]


def checkpoint_in_eval_mode(model) -> None:
    """transformers checkpoints a decoder layer only while the layer is in training mode, and PPO keeps every model in
    eval mode (no dropout), so `gradient_checkpointing` would silently do nothing. Mark the checkpointed layers
    themselves as training — not their submodules, so no dropout turns on; the layer's flag gates only the
    checkpoint. Call it after every `eval()`/`train()` (the stacks' `train` does)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    for m in model.modules():
        if isinstance(m, GradientCheckpointingLayer) and m.gradient_checkpointing:
            m.training = True


def _generation_context(model, spec: FSDPSpec | None):
    """Sharded: keep the policy's layers gathered for the whole `generate` (see distributed.gathered). Not sharded:
    under bf16 autocast, the Linear weights cast once for the whole `generate`, not once per token
    (`models.precision`; the same tokens)."""
    if spec is not None:
        return gathered(model, spec) if spec.gather_for_generation else contextlib.nullcontext()
    return linear_weights_cast_once(model)


__all__ = ["POLICY", "Stack"]
