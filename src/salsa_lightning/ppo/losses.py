"""The objective of one clipped update on a minibatch of a rollout (CleanRL's inner loop body): the clipped policy
loss, plus the clipped value loss when there is a critic, plus `β · k3` to the anchor(s) when the KL is in the loss.

The objective comes in two parts, the policy's and the critic's, because they share no trainable parameter (separate
models in the full layout; separate adapters and heads on a frozen base in the LoRA layout): back-propagating each
part as soon as it is built gives exactly the gradients of their sum, while only one forward graph — the largest
thing an update holds, a few hundred MB of activations for a 135M model — is alive at a time instead of two.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from salsa_lightning import rl
from salsa_lightning.ppo.config import GenerationSpec, PPOSpec
from salsa_lightning.ppo.rollout import response_logprobs
from salsa_lightning.ppo.stack import POLICY, Stack


def minibatch_losses(
    stack: Stack, m: dict[str, torch.Tensor], ppo: PPOSpec, gen: GenerationSpec, kl_coef: float
) -> Iterator[tuple[torch.Tensor, dict[str, torch.Tensor]]]:
    """The parts of the objective for the minibatch `m` (`Rollout.rows`), each with the statistics known so far:
    first the policy's (clipped policy loss, plus `kl_coef · kl` when the KL is in the loss), then, with a critic, the
    critic's (`vf_coef` · clipped value loss; its statistics then hold every key). A part's forward pass runs only when
    the caller asks for it, so the caller runs the previous part's backward first to free that part's graph."""
    new_logp = response_logprobs(stack, POLICY, m["ids"], m["mask"], m["pos"], m["response"], gen.temperature)
    pg = rl.policy_loss(new_logp, m["logp"], m["advantages"], m["resp_mask"], ppo.cliprange)
    loss, kl = pg.loss, None
    if ppo.kl_in == "loss":  # GRPO's form, averaged over the anchors (MKL)
        kl = torch.stack([rl.kl_loss(new_logp, ref, m["resp_mask"]) for ref in m["anchor_logp"]]).mean()
        loss = loss + kl_coef * kl
    yield loss, rl.update_metrics(pg, None, kl)
    if ppo.critic:
        values = rl.response_logits(stack.values(m["ids"], m["mask"], m["pos"]), m["response"].shape[1])  # (b, R)
        vf = rl.value_loss(values, m["values"], m["returns"], m["resp_mask"], ppo.cliprange_value)
        yield ppo.vf_coef * vf.loss, rl.update_metrics(pg, vf, kl)


def minibatch_loss(
    stack: Stack, m: dict[str, torch.Tensor], ppo: PPOSpec, gen: GenerationSpec, kl_coef: float
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(loss, its statistics): the sum of `minibatch_losses`, both graphs alive (for one joint backward)."""
    parts = list(minibatch_losses(stack, m, ppo, gen, kl_coef))
    total = parts[0][0]
    for part, _ in parts[1:]:
        total = total + part
    return total, parts[-1][1]


__all__ = ["minibatch_loss", "minibatch_losses"]
