"""Critic-free advantage estimators and GRPO's KL-in-the-loss term (DESIGN.md §2).

With G = `group_size` responses sampled per prompt and their sequence rewards r_1..r_G (the score
minus any sequence-level penalty, e.g. `masked_sum(shape_rewards(...).rewards, mask, dim=1)`):

- GRPO (Shao et al. 2024, "DeepSeekMath", §4.1.2):  A_i = (r_i - mean_j r_j) / (std_j r_j + ε);
  Dr. GRPO (Liu et al. 2025, "Understanding R1-Zero-like training", §3.1) drops the division by the std.
- RLOO (Ahmadian et al. 2024, "Back to basics", eq. 7):  A_i = r_i - (1/(G-1)) Σ_{j≠i} r_j.
- REINFORCE++ (Hu 2025, "REINFORCE++", §3):  A_t = the token-level return G_t = Σ_{k≥t} γ^{k-t} r_k of
  the per-token rewards (KL in the reward), whitened over every real token of the global batch.

The sequence-level advantages are spread over the response's real tokens by `broadcast_to_tokens`
and then enter the same `policy_loss` as PPO's. GRPO puts the KL to the anchor into the loss instead
of the reward: `kl_loss` (then β = 0 in `shape_rewards`).

Batches hold the rows of one prompt contiguously (row i belongs to group i // G); in a data-parallel
run every rank must hold whole groups. Advantages are targets: they are computed without gradient.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from salsa_lightning.rl.gae import compute_gae
from salsa_lightning.rl.kl import kl_k3
from salsa_lightning.rl.masked import masked_fill_pad, masked_mean


def _groups(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """(B,) -> (B // G, G): one row per prompt."""
    assert scores.dim() == 1 and scores.numel() % group_size == 0, (tuple(scores.shape), group_size)
    return scores.view(-1, group_size)


@torch.no_grad()
def group_advantages(
    scores: torch.Tensor, group_size: int, scale_by_std: bool = True, eps: float = 1e-6
) -> torch.Tensor:
    """GRPO: `(scores - group mean) / (group std + eps)`; Dr. GRPO with `scale_by_std=False` (no division).

    `scores`: (B,) sequence rewards, B = n_prompts · `group_size`, rows of one prompt contiguous.
    Returns (B,). The std is the unbiased one (Bessel's correction, `torch.std`'s default), as TRL's
    `GRPOTrainer` and OpenRLHF use; with `group_size=1` it is taken as 0 (no correction possible), so
    the advantage is 0, never NaN. A group whose scores are all equal gets advantage 0: it carries no
    signal about which of its responses is better.
    """
    grouped = _groups(scores, group_size)  # (n_prompts, G)
    adv = grouped - grouped.mean(dim=1, keepdim=True)
    if scale_by_std:
        std = grouped.std(dim=1, keepdim=True, correction=1 if group_size > 1 else 0)  # (n_prompts, 1)
        adv = adv / (std + eps)
    return adv.reshape(-1)  # (B,)


@torch.no_grad()
def rloo_advantages(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """RLOO: each score minus the mean of the other `group_size - 1` scores of its prompt. (B,) -> (B,).

    The leave-one-out baseline does not depend on r_i, so the estimator stays unbiased; the advantages of
    one group sum to 0 (it equals G/(G-1) · (r_i - mean_j r_j)). Needs `group_size >= 2`.
    """
    assert group_size >= 2, group_size
    grouped = _groups(scores, group_size)  # (n_prompts, G)
    others_mean = (grouped.sum(dim=1, keepdim=True) - grouped) / (group_size - 1)
    return (grouped - others_mean).reshape(-1)  # (B,)


@torch.no_grad()
def informative_groups(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """(B,) bool: the rows of the groups whose `group_size` scores are not all equal.

    A group of equal scores gets advantage 0 from `group_advantages` and `rloo_advantages`, so with the KL in the
    loss its rows add no policy gradient, only the KL term. Leaving them out of the update is DAPO's dynamic
    sampling (Yu et al. 2025, "DAPO", §3.2) without the re-sampling that refills the batch. Rows of one prompt are
    contiguous, as everywhere here.
    """
    grouped = _groups(scores, group_size)  # (n_prompts, G)
    varied = (grouped != grouped[:, :1]).any(dim=1)  # (n_prompts,)
    return varied.repeat_interleave(group_size)  # (B,)


def reinforce_pp_advantages(
    rewards: torch.Tensor,
    mask: torch.Tensor,
    gamma: float = 1.0,
    all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """REINFORCE++: the return-to-go of (B, T) per-token `rewards`, whitened over all real tokens. (B, T), 0 at padding.

    G_t = Σ_{k≥t} γ^{k-t} r_k over the real tokens of the row (0 past its last one). That is GAE with
    V ≡ 0 and λ = 1 (δ_t = r_t, A_t = r_t + γ·A_{t+1}), so it reuses `compute_gae` and its whitening:
    mean 0, unbiased variance 1 over the real tokens of the batch. `all_reduce` sums the whitening
    moments over data-parallel processes, exactly as in `compute_gae`, so that the whole global batch
    shares one mean and std. `rewards` come from `shape_rewards` (KL in the reward).
    """
    gae = compute_gae(rewards, torch.zeros_like(rewards), mask, gamma, 1.0, whiten=True, all_reduce=all_reduce)
    return gae.advantages


def broadcast_to_tokens(advantages: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B,) sequence advantages -> (B, T): row b's value on each of its real tokens, 0 at padding."""
    per_token = advantages.unsqueeze(1).expand(mask.shape)  # (B, T)
    return masked_fill_pad(per_token, mask)


def kl_loss(logp: torch.Tensor, anchor_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """GRPO's KL penalty in the loss: the masked mean of k3(π_θ ‖ π_anchor) over real tokens (a scalar).

    `logp`: (B, T) current log-probs of the sampled tokens (with gradient); `anchor_logp`: (B, T) the
    anchor's (soup or SFT), detached. k3 = (r - 1) - log r with r = π_anchor/π_θ (`kl.kl_k3`) has
    d k3 / d logp = 1 - r: positive where the policy is likelier than the anchor, so a gradient step
    lowers logp there and raises it where the anchor is likelier — toward `anchor_logp` either way.
    Padding may hold NaN: both inputs are zeroed there first, so neither the loss nor its gradient sees it.
    """
    real = mask.bool()
    k3 = kl_k3(masked_fill_pad(logp, real), masked_fill_pad(anchor_logp.detach(), real))  # (B, T), 0 at padding
    return masked_mean(k3, real)
