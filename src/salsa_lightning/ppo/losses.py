"""The objective of one clipped update on a minibatch of a rollout (CleanRL's inner loop body): the clipped policy
loss, plus the clipped value loss when there is a critic, plus `β · k3` to the anchor(s) when the KL is in the loss."""

from __future__ import annotations

import torch

from salsa_lightning import rl
from salsa_lightning.ppo.config import GenerationSpec, PPOSpec
from salsa_lightning.ppo.rollout import response_logprobs
from salsa_lightning.ppo.stack import POLICY, Stack


def minibatch_loss(
    stack: Stack, m: dict[str, torch.Tensor], ppo: PPOSpec, gen: GenerationSpec, kl_coef: float
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(loss, its statistics) for the minibatch `m` (`Rollout.rows`), through the current policy (and critic)."""
    new_logp = response_logprobs(stack, POLICY, m["ids"], m["mask"], m["pos"], m["response"], gen.temperature)
    pg = rl.policy_loss(new_logp, m["logp"], m["advantages"], m["resp_mask"], ppo.cliprange)
    loss, vf, kl = pg.loss, None, None
    if ppo.critic:
        values = rl.response_logits(stack.values(m["ids"], m["mask"], m["pos"]), m["response"].shape[1])  # (b, R)
        vf = rl.value_loss(values, m["values"], m["returns"], m["resp_mask"], ppo.cliprange_value)
        loss = loss + ppo.vf_coef * vf.loss
    if ppo.kl_in == "loss":  # GRPO's form, averaged over the anchors (MKL)
        kl = torch.stack([rl.kl_loss(new_logp, ref, m["resp_mask"]) for ref in m["anchor_logp"]]).mean()
        loss = loss + kl_coef * kl
    return loss, rl.update_metrics(pg, vf, kl)


__all__ = ["minibatch_loss"]
