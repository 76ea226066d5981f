"""PPO's clipped losses and the per-update statistics logged beside them.

Policy (Schulman et al. 2017, "Proximal policy optimization algorithms", eq. 7, written as a loss):

    ρ_t = exp(logp_t - old_logp_t)
    pg_losses  = -A_t·ρ_t
    pg_losses2 = -A_t·clip(ρ_t, 1-ε, 1+ε)
    loss       = masked_mean(max(pg_losses, pg_losses2))

Value (the clipped form of OpenAI baselines' PPO2, used by Ziegler et al. 2019 and TRL):

    V_clipped = V_old + clip(V - V_old, -ε_v, ε_v)
    loss      = ½·masked_mean(max((V - G)², (V_clipped - G)²))

Names follow CleanRL/TRL (`pg_losses`, `pg_losses2`, `clipfrac`, `approx_kl`). Every input may hold
garbage (even NaN) at padded positions: it is zeroed before use, so neither the loss nor its gradient
sees it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from salsa_lightning.rl.masked import masked_fill_pad, masked_mean, masked_moments, masked_var, mean_var_from_moments


@dataclass(frozen=True)
class PolicyLossOutput:
    """`loss` (scalar, differentiable); the rest are (B, T) per-token terms or detached scalar stats."""

    loss: torch.Tensor
    pg_losses: torch.Tensor  # (B, T) -A·ρ
    pg_losses2: torch.Tensor  # (B, T) -A·clip(ρ)
    ratio: torch.Tensor  # (B, T) ρ, 1 at padding
    clipfrac: torch.Tensor  # scalar: fraction of real tokens where the clipped term is the larger one
    approx_kl: torch.Tensor  # scalar: ½·mean((logp - old_logp)²), TRL's `policy/approxkl_avg`


@dataclass(frozen=True)
class ValueLossOutput:
    """`loss` (scalar, differentiable, includes the ½); `clipfrac` is detached."""

    loss: torch.Tensor
    vf_losses1: torch.Tensor  # (B, T) (V - G)²
    vf_losses2: torch.Tensor  # (B, T) (V_clipped - G)²
    clipfrac: torch.Tensor  # scalar: TRL's `val/clipfrac_avg`


def approx_kl(logp: torch.Tensor, old_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """½·mean over real tokens of (logp - old_logp)²: the k2 estimator of KL(π_old ‖ π_θ).

    This is TRL's `approxkl` (Schulman's "Approximating KL divergence" k2; CleanRL logs k3 instead).
    A diagnostic of how far one update moved the policy — not the KL to the anchor. Detached.
    """
    with torch.no_grad():
        return 0.5 * masked_mean((logp - old_logp) ** 2, mask)


def policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    cliprange: float = 0.2,
) -> PolicyLossOutput:
    """Clipped surrogate loss (Schulman et al. 2017, eq. 7).

    `logp`: (B, T) current log-probs (with gradient); `old_logp`: (B, T) log-probs at rollout time;
    `advantages`: (B, T), already whitened; `mask`: (B, T) real tokens; `cliprange`: ε.
    Gradient: for A > 0 the loss decreases with `logp` while ρ < 1+ε and is flat beyond (the clip
    binds); symmetrically for A < 0 below 1-ε.
    """
    real = mask.bool()
    log_ratio = masked_fill_pad(logp - old_logp.detach(), real)  # 0 at padding -> ρ = 1, finite gradient
    adv = masked_fill_pad(advantages.detach(), real)
    ratio = torch.exp(log_ratio)  # (B, T)
    pg_losses = -adv * ratio
    pg_losses2 = -adv * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    loss = masked_mean(torch.maximum(pg_losses, pg_losses2), real)
    with torch.no_grad():
        clipfrac = masked_mean((pg_losses2 > pg_losses).to(logp.dtype), real)
    return PolicyLossOutput(
        loss=loss,
        pg_losses=pg_losses,
        pg_losses2=pg_losses2,
        ratio=ratio,
        clipfrac=clipfrac,
        approx_kl=approx_kl(logp, old_logp, real),
    )


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    cliprange_value: float | None = 0.2,
) -> ValueLossOutput:
    """Clipped value loss ½·masked_mean(max((V-G)², (V_old + clip(V-V_old, ±ε_v) - G)²)).

    `values`: (B, T) current critic outputs (with gradient); `old_values`: (B, T) at rollout time;
    `returns`: (B, T) targets G from `compute_gae`; `cliprange_value`: ε_v (TRL's default 0.2), or
    None for the plain ½·(V-G)² loss. Its gradient moves V toward G.
    """
    real = mask.bool()
    v = masked_fill_pad(values, real)
    v_old = masked_fill_pad(old_values.detach(), real)
    g = masked_fill_pad(returns.detach(), real)
    vf_losses1 = (v - g) ** 2  # (B, T)
    if cliprange_value is None:
        vf_losses2 = vf_losses1
    else:
        v_clipped = v_old + torch.clamp(v - v_old, -cliprange_value, cliprange_value)
        vf_losses2 = (v_clipped - g) ** 2
    loss = 0.5 * masked_mean(torch.maximum(vf_losses1, vf_losses2), real)
    with torch.no_grad():
        clipfrac = masked_mean((vf_losses2 > vf_losses1).to(values.dtype), real)
    return ValueLossOutput(loss=loss, vf_losses1=vf_losses1, vf_losses2=vf_losses2, clipfrac=clipfrac)


@torch.no_grad()
def explained_variance(
    values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """1 - Var[G - V] / Var[G] over real tokens (scalar; NaN when Var[G] = 0, as in CleanRL).

    1 means the critic predicts the returns perfectly, 0 no better than a constant, < 0 worse.
    `all_reduce` (data-parallel runs): sums `masked_moments` over processes, so that the variances are those of
    the global batch (a ratio of variances is not the mean of the ranks' ratios).
    """
    if all_reduce is None:
        var_g = masked_var(returns, mask, unbiased=False)
        var_err = masked_var(returns - values, mask, unbiased=False)
    else:
        moments = all_reduce(torch.stack([masked_moments(returns, mask), masked_moments(returns - values, mask)]))
        var_g, var_err = (mean_var_from_moments(m, unbiased=False)[1].float() for m in moments)
    return torch.where(var_g > 0, 1.0 - var_err / var_g, torch.full_like(var_g, float("nan")))
