"""Per-token PPO rewards: the KL penalty on every real token plus the score on the last one.

Ziegler et al. 2019 (§2) and the SALSA paper (eq. 2, 4) put the KL term into the reward:
`r_t = -β·kl_t` for each real response token, and the reward model's scalar `R(x, y)` is added at the
last real token, where the response (the RL episode) ends. "Last real" comes from the response mask
(`sequences.response_mask`), so with pad == EOS the score lands on the EOS itself, never on the
padding after it (TRL issue #3750).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from salsa_lightning.errors import SalsaError
from salsa_lightning.rl.masked import masked_fill_pad
from salsa_lightning.rl.sequences import last_token_index


@dataclass(frozen=True)
class ShapedRewards:
    """Per-token rewards, all (B, T) and 0 at padding.

    `rewards = non_score_rewards + score at the last real token`; `non_score_rewards = -β·kl`
    (logged as TRL's `objective/non_score_reward`, summed per sequence).
    """

    rewards: torch.Tensor
    non_score_rewards: torch.Tensor


def check_kl_coef(beta: float | torch.Tensor) -> float:
    """β as a float; a negative β (which would reward moving away from the anchor) is a `SalsaError`."""
    value = float(beta)
    if not value >= 0:  # also catches NaN
        raise SalsaError(f"The KL coefficient β must be >= 0 (got {value}); set `kl_coef` to e.g. 0.2 (PPO) or 0.01.")
    return value


def shape_rewards(
    scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float | torch.Tensor
) -> ShapedRewards:
    """`r_t = -β·kl_t` on real tokens, plus `scores[b]` at row b's last real token.

    `scores`: (B,) reward-model scores (after any normalisation or missing-EOS penalty). `kl`: (B, T)
    per-token KL estimates (`kl.kl_penalty` or `kl.multi_anchor_kl`), garbage allowed at padding.
    `mask`: (B, T) real response tokens. A row with no real token gets no score (there is no step to
    put it on); `response_mask` gives every row at least one unless `max_new_tokens` is 0.
    """
    non_score = masked_fill_pad(-float(kl_coef) * kl, mask)  # (B, T)
    last = last_token_index(mask)  # (B,)
    has_token = last >= 0
    rows = torch.arange(kl.shape[0], device=kl.device)[has_token]
    score_t = torch.zeros_like(non_score)
    score_t[rows, last[has_token]] = scores[has_token].to(non_score.dtype)
    return ShapedRewards(rewards=non_score + score_t, non_score_rewards=non_score)


def apply_missing_eos_penalty(scores: torch.Tensor, has_eos: torch.Tensor, penalty: float | None) -> torch.Tensor:
    """Subtract `penalty` from the score of every response that did not end with EOS (TRL's `missing_eos_penalty`).

    `scores`: (B,), `has_eos`: (B,) bool from `sequences.contains_eos`. `penalty=None` is a no-op.
    Truncated responses would otherwise be free to ramble up to `max_new_tokens`.
    """
    if penalty is None:
        return scores
    return scores - penalty * (~has_eos.bool()).to(scores.dtype)


def normalize_scores(scores: torch.Tensor, mean: float, std: float) -> torch.Tensor:
    """`(scores - mean) / std` with the reward statistics the reward-model stage stored (`std > 0`: checked where
    the statistics are read, `reward.model.reward_stats`)."""
    return (scores - mean) / std
