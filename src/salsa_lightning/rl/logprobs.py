"""Token log-probabilities and entropies from logits.

Alignment convention: `logits[:, t]` is the distribution that produced `tokens[:, t]`. A causal LM's
logits at position i predict token i + 1, so the caller shifts first — `response_logits` below does
that shift for the usual `[prompt | response]` layout and is the one place it happens.

Temperature: PPO's ratio and KL must use the same distribution the responses were sampled from, so
generation at temperature τ means log-probs of `logits / τ` (TRL and OpenRLHF do the same).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from salsa_lightning.errors import SalsaError

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _check_temperature(temperature: float) -> None:
    if not temperature > 0:
        raise SalsaError(f"The sampling temperature must be > 0 (got {temperature}); set `temperature` to e.g. 1.0.")


def response_logits(logits: torch.Tensor, response_length: int) -> torch.Tensor:
    """The logits that produced the last `response_length` tokens of a `[prompt | response]` sequence.

    `logits`: (B, P + R, ...) from one forward pass over prompt and response. Position i predicts
    token i + 1, so the response tokens at P .. P+R-1 come from positions P-1 .. P+R-2. Works for any
    per-position output (logits (B, L, V) or values (B, L)). Returns (B, R, ...).
    """
    if not 0 < response_length < logits.shape[1]:
        raise ValueError(f"response_length must be in [1, {logits.shape[1] - 1}], got {response_length}")
    return logits[:, -response_length - 1 : -1]


def logprobs_from_logits(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log π(tokens[b, t]) under `softmax(logits[b, t] / temperature)`.

    `logits`: (B, T, V), `tokens`: (B, T) int. Returns (B, T) in float32 or the logits' dtype if wider.

    Memory: `log_softmax` saves its own (B, T, V) output for backward, next to the logits the caller
    already holds; gathering the chosen logit and subtracting `logsumexp` saves only the logits (the
    caller's tensor at τ = 1, its scaled copy otherwise) and (B, T) results. In float16/bfloat16 the
    logsumexp loses too much precision, so those dtypes go one sequence at a time in float32 (the extra
    memory is one (T, V) row, not the batch).
    """
    _check_temperature(temperature)
    if temperature != 1.0:
        logits = logits / temperature  # (B, T, V); skipped at τ = 1 to avoid the copy
    idx = tokens.long().unsqueeze(-1)  # (B, T, 1)
    if logits.dtype in _LOW_PRECISION:
        rows = [
            torch.log_softmax(row.float(), dim=-1).gather(-1, i).squeeze(-1) for row, i in zip(logits, idx, strict=True)
        ]
        return torch.stack(rows)  # (B, T)
    chosen = logits.gather(-1, idx).squeeze(-1)  # (B, T)
    # one sequence at a time: logsumexp's exp(z - max) temporary is (T, V), not (B, T, V); the same numbers
    return chosen - torch.stack([torch.logsumexp(row, dim=-1) for row in logits])  # (B, T)


def entropy_from_logits(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Per-position entropy H = logsumexp(z) - Σ_v softmax(z)_v z_v of `softmax(logits / temperature)`.

    `logits`: (B, T, V); returns (B, T) (float32 for low-precision inputs). Average over real tokens
    with `masked_mean(entropy, mask)`; padded positions hold meaningless values.

    Memory: one sequence at a time, so the softmax and its product with the logits are (T, V) temporaries, not two
    more (B, T, V) tensors beside the logits (the same numbers: each position's sums do not depend on the batch).
    """
    _check_temperature(temperature)
    if temperature != 1.0:
        logits = logits / temperature  # (B, T, V)
    return torch.stack([_entropy(row.float() if row.dtype in _LOW_PRECISION else row) for row in logits])  # (B, T)


def step_logprobs(
    step_logits: Sequence[torch.Tensor], tokens: torch.Tensor, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-probs, entropies), both (B, T), of `tokens` (B, T) from `generate`'s raw per-step logits
    (`output_logits=True`: T tensors (B, V), step t's the distribution that produced `tokens[:, t]`), by
    `logprobs_from_logits` and `entropy_from_logits` themselves, so the same numbers as on the stacked (B, T, V).

    Memory: one step at a time (each (B, V) taken as one "sequence" of B positions), so no (B, T, V) copy is made
    beside the T tensors `generate` already holds.
    """
    logp = [logprobs_from_logits(z[None], tokens[None, :, t], temperature)[0] for t, z in enumerate(step_logits)]
    entropy = [entropy_from_logits(z[None], temperature)[0] for z in step_logits]
    return torch.stack(logp, dim=1), torch.stack(entropy, dim=1)  # (B, T) each


def _entropy(logits: torch.Tensor) -> torch.Tensor:
    """(T,) entropies of (T, V) logits."""
    probs = torch.softmax(logits, dim=-1)  # (T, V)
    return torch.logsumexp(logits, dim=-1) - (probs * logits).sum(dim=-1)
