"""The per-update statistics DESIGN.md §2 asks to log, under TRL's metric names.

Defined once here so that every run (and every comparison with a TRL run) means the same thing by the
same name. Sequence-level quantities follow TRL: a per-token term is summed over each response's real
tokens, then averaged over the batch (so `objective/kl` is a KL per response, not per token). All
values are detached 0-dim tensors; the module logs them without a host sync per metric.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from salsa_lightning.rl.losses import PolicyLossOutput, ValueLossOutput
from salsa_lightning.rl.masked import masked_moments, masked_sum, mean_var_from_moments
from salsa_lightning.rl.rewards import ShapedRewards


@torch.no_grad()
def rollout_metrics(
    scores: torch.Tensor,
    shaped: ShapedRewards,
    kl: torch.Tensor,
    mask: torch.Tensor,
    has_eos: torch.Tensor,
    entropy: torch.Tensor | None = None,
    named_kls: dict[str, torch.Tensor] | None = None,
    all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Statistics of one rollout batch.

    `scores`: (B,) the scores put into the reward (after normalisation/penalty); `shaped`: from
    `shape_rewards`; `kl`: (B, T) the per-token KL to the training anchor; `mask`: (B, T);
    `has_eos`: (B,) from `contains_eos`; `entropy`: optional (B, T) per-token entropy;
    `named_kls`: optional extra per-token KLs logged as `objective/kl_<name>` — the module passes
    `{"init": ..., "soup": ...}` so both are always logged (issue 6: reviewers asked for both).

    Keys: `objective/kl`, `objective/kl_<name>`, `objective/scores`, `objective/scores_std`,
    `objective/non_score_reward`, `objective/rlhf_reward`, `objective/entropy`, `response_length`,
    `val/num_eos_tokens` (number of responses that ended with EOS).

    `all_reduce` (data-parallel runs): sums `masked_moments` over processes, so that `objective/scores_std` is the
    global batch's std (the other keys are per-rank means and counts; the caller averages or sums them).
    """
    non_score = masked_sum(shaped.non_score_rewards, mask, dim=1)  # (B,)
    scores = scores.float()
    out = {"objective/kl": masked_sum(kl, mask, dim=1).mean()}
    for name, value in (named_kls or {}).items():
        out[f"objective/kl_{name}"] = masked_sum(value, mask, dim=1).mean()
    out["objective/scores"] = scores.mean()
    if all_reduce is None:
        out["objective/scores_std"] = scores.std(unbiased=False)
    else:
        moments = all_reduce(masked_moments(scores, torch.ones_like(scores, dtype=torch.bool)))
        out["objective/scores_std"] = mean_var_from_moments(moments, unbiased=False)[1].sqrt().float()
    out["objective/non_score_reward"] = non_score.mean()
    out["objective/rlhf_reward"] = (scores + non_score).mean()
    if entropy is not None:
        out["objective/entropy"] = masked_sum(entropy, mask, dim=1).mean()
    out["response_length"] = mask.bool().sum(dim=1).float().mean()
    out["val/num_eos_tokens"] = has_eos.bool().sum().float()
    return out


@torch.no_grad()
def update_metrics(
    pg: PolicyLossOutput, vf: ValueLossOutput | None = None, kl_loss: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """Statistics of one minibatch update; the module averages them over the update's minibatches.

    Keys: `policy/approxkl_avg`, `policy/clipfrac_avg`, `loss/policy_avg`; with a critic `loss/value_avg`,
    `val/clipfrac_avg` (`val/explained_variance` comes from `explained_variance` on the rollout); with the KL
    in the loss `loss/kl_avg`.
    """
    out = {
        "policy/approxkl_avg": pg.approx_kl.detach(),
        "policy/clipfrac_avg": pg.clipfrac.detach(),
        "loss/policy_avg": pg.loss.detach(),
    }
    if vf is not None:
        out["loss/value_avg"] = vf.loss.detach()
        out["val/clipfrac_avg"] = vf.clipfrac.detach()
    if kl_loss is not None:
        out["loss/kl_avg"] = kl_loss.detach()
    return out
