"""Generalised advantage estimation over response tokens (Schulman et al. 2016, "High-dimensional
continuous control using generalized advantage estimation", eq. 16).

    δ_t = r_t + γ·V_{t+1} - V_t
    A_t = δ_t + γλ·A_{t+1}
    G_t = A_t + V_t          (the critic's regression target)

Each response is one episode that ends at its last real token: there V_{t+1} = 0 and A_{t+1} = 0.
Padded positions get A = G = 0 and never leak into real ones, whatever values they hold.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from salsa_lightning.rl.masked import masked_fill_pad, masked_whiten


@dataclass(frozen=True)
class GAEOutput:
    """`advantages` (B, T), whitened if asked; `returns` (B, T) = raw advantages + values. 0 at padding."""

    advantages: torch.Tensor
    returns: torch.Tensor


@torch.no_grad()
def compute_gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float = 1.0,
    lam: float = 0.95,
    whiten: bool = True,
    all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> GAEOutput:
    """Advantages and returns for (B, T) per-token `rewards` and critic `values` over real tokens `mask`.

    `returns` always come from the un-whitened advantages (they are value targets in reward units);
    `whiten=True` then normalises the advantages the policy loss sees to mean 0, variance 1 over the
    real tokens of the batch (TRL, Ziegler et al. 2019). Keeping both in one call means the whitened
    tensor is the one returned — not a copy that a caller forgets to pass on.

    `all_reduce` (data-parallel runs): sums whitening moments over processes, so every rank whitens with the
    statistics of the global batch, as one process holding all of it would (see `masked_whiten`).

    Masks are expected to be contiguous per row (left or right padding); a gap inside a row would act
    as an episode end. Defaults are TRL's (`gamma=1`, `lam=0.95`). Runs without gradient: advantages
    and returns are targets.
    """
    real = mask.bool()
    r = masked_fill_pad(rewards, real)  # (B, T)
    v = masked_fill_pad(values, real)  # (B, T); V = 0 after the end makes V_{T_b} = 0
    T = r.shape[1]
    advantages = torch.zeros_like(r)
    next_value = torch.zeros_like(r[:, 0])  # (B,)
    next_adv = torch.zeros_like(r[:, 0])  # (B,)
    for t in reversed(range(T)):
        delta = r[:, t] + gamma * next_value - v[:, t]
        # where(): a padded position is 0, so the recursion restarts cleanly at each row's last real token
        next_adv = torch.where(real[:, t], delta + gamma * lam * next_adv, 0.0)
        advantages[:, t] = next_adv
        next_value = v[:, t]
    returns = advantages + v  # already 0 at padding
    if whiten:
        advantages = masked_whiten(advantages, real, shift_mean=True, all_reduce=all_reduce)
    return GAEOutput(advantages=advantages, returns=returns)
