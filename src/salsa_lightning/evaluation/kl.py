"""KL of a policy to a reference on the policy's own responses, with the estimator PPO uses (`rl.kl_k1`)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.nn.utils.rnn import pad_sequence

from salsa_lightning.rl import kl_k1, masked_sum


def sequence_kl(logp: Sequence[torch.Tensor], logp_ref: Sequence[torch.Tensor]) -> torch.Tensor:
    """(N,) per-response KL estimate Σ_t (log π(y_t) - log π_ref(y_t)) over each response's real tokens.

    `logp[i]`, `logp_ref[i]`: (T_i,) log-probs of response i's tokens under the policy and the reference.
    With y drawn from π (or π's greedy choice, as in evaluation) this is the sequence-level k1 estimate
    that PPO's reward penalises (DESIGN §2); its mean over prompts is what the systems table reports.
    """
    if len(logp) != len(logp_ref):
        raise ValueError(f"{len(logp)} policy rows but {len(logp_ref)} reference rows")
    if not logp:
        return torch.empty(0)
    for i, (a, b) in enumerate(zip(logp, logp_ref, strict=True)):
        if a.shape != b.shape:
            raise ValueError(f"row {i}: policy log-probs {tuple(a.shape)} vs reference {tuple(b.shape)}")
    lp = pad_sequence(list(logp), batch_first=True)  # (N, T)
    lp_ref = pad_sequence(list(logp_ref), batch_first=True)  # (N, T)
    mask = pad_sequence([torch.ones(len(a), dtype=torch.bool) for a in logp], batch_first=True)  # (N, T)
    return masked_sum(kl_k1(lp, lp_ref), mask, dim=1)
