"""Pure reward-model math (paper eq. 1; DESIGN.md §2)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def bradley_terry_loss(
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    margin: torch.Tensor | float | None = None,
    center_rewards_coefficient: float | None = None,
) -> torch.Tensor:
    """`mean(-log σ(r_c - r_r - margin))` (paper eq. 1; the margin as in Llama-2's reward model), plus
    `coef · mean((r_c + r_r)²)` when centering is on (Eisenstein et al. 2023; TRL's
    `center_rewards_coefficient`), which pins the reward's free offset near zero.

    chosen, rejected: (B,) rewards. Returns a scalar.
    """
    diff = chosen - rejected
    if margin is not None:
        diff = diff - margin
    loss = -F.logsigmoid(diff).mean()
    if center_rewards_coefficient:
        loss = loss + center_rewards_coefficient * ((chosen + rejected) ** 2).mean()
    return loss


def pairwise_stats(chosen: torch.Tensor, rejected: torch.Tensor) -> dict[str, torch.Tensor]:
    """Accuracy (chosen scored strictly higher; ties count as wrong) and mean margin r_c - r_r."""
    diff = chosen - rejected
    return {"accuracy": (diff > 0).float().mean(), "margin": diff.mean()}
