"""Per-token estimators of KL(π_θ ‖ π_anchor) from the log-probs of the sampled tokens.

With tokens y_t ~ π_θ, `logp = log π_θ(y_t|·)` and `logp_ref = log π_anchor(y_t|·)`, and
r = π_anchor / π_θ = exp(logp_ref - logp), the estimators of J. Schulman, "Approximating KL
divergence" (2020, http://joschu.net/blog/kl-approx.html) are

- k1 = -log r = logp - logp_ref            unbiased, high variance, can be negative per token;
- k2 = ½ (log r)²                          biased, low variance, ≥ 0;
- k3 = (r - 1) - log r                     unbiased, low variance, ≥ 0.

The SALSA paper (eq. 2, 4) and DESIGN.md §2 use k1 in the reward; k2 and k3 are options. The anchor is
the SFT model for PPO (eq. 2) and the soup for SALSA (eq. 4); for the MKL ablation (eq. 5),
`multi_anchor_kl` averages the estimator over several anchors.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from salsa_lightning.errors import SalsaError


def kl_k1(logp: torch.Tensor, logp_ref: torch.Tensor) -> torch.Tensor:
    """k1 = log π_θ - log π_anchor (Schulman 2020). Any matching shapes, e.g. (B, T)."""
    return logp - logp_ref


def kl_k2(logp: torch.Tensor, logp_ref: torch.Tensor) -> torch.Tensor:
    """k2 = ½ (log π_θ - log π_anchor)² (Schulman 2020)."""
    return 0.5 * (logp - logp_ref) ** 2


def kl_k3(logp: torch.Tensor, logp_ref: torch.Tensor) -> torch.Tensor:
    """k3 = (r - 1) - log r with r = exp(logp_ref - logp) (Schulman 2020).

    Written `expm1(d) - d` (d = log r): the same value, without the cancellation of `exp(d) - 1` for
    the small d typical of a policy near its anchor. Large positive d (the anchor far likelier than the
    policy) grows like exp(d) and overflows past d ≈ 88 in float32, as the formula does.
    """
    log_r = logp_ref - logp
    return torch.expm1(log_r) - log_r


KL_ESTIMATORS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "k1": kl_k1,
    "k2": kl_k2,
    "k3": kl_k3,
}


def get_kl_estimator(name: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The estimator called `name` ("k1", "k2" or "k3"); anything else is a `SalsaError`."""
    try:
        return KL_ESTIMATORS[name]
    except KeyError:
        raise SalsaError(
            f"Unknown KL estimator {name!r}; set `kl_estimator` to one of {', '.join(sorted(KL_ESTIMATORS))}."
        ) from None


def kl_penalty(logp: torch.Tensor, logp_ref: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token KL estimate to one anchor. `logp`, `logp_ref`: (B, T) -> (B, T)."""
    return get_kl_estimator(estimator)(logp, logp_ref)


def multi_anchor_kl(logp: torch.Tensor, logp_refs: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Mean over J anchors of the per-token KL estimate: the MKL ablation, SALSA paper eq. 5.

    `logp`: (B, T); `logp_refs`: (J, B, T), anchor j's log-probs of the same tokens. Returns (B, T):
    `mean_j estimator(logp, logp_refs[j])`. With J = 1 this is exactly `kl_penalty` (MKL over one
    anchor is PPO), and for k1 it equals `logp - mean_j logp_refs[j]`.
    """
    if logp_refs.dim() != logp.dim() + 1 or logp_refs.shape[1:] != logp.shape:
        raise ValueError(f"logp_refs must be (J, *{tuple(logp.shape)}), got {tuple(logp_refs.shape)}")
    fn = get_kl_estimator(estimator)
    return fn(logp.unsqueeze(0), logp_refs).mean(dim=0)  # (J, B, T) -> (B, T)
