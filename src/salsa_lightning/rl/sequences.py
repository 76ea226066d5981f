"""Which generated tokens are real: response masks, EOS detection, last-token indices, position ids.

A response is real up to and including its first EOS and padding after it. The mask is built from
the *first EOS among generated positions*, never from `token != pad_id`: SmolLM2 (like many chat
models) pads with its EOS token, so pad and EOS ids are equal and a pad-id test would drop the EOS or,
worse, place the reward on a pad token (TRL issue #3750). Everything downstream — the reward's
position, GAE's end, every masked mean — takes this mask.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def _is_eos(tokens: torch.Tensor, eos_token_id: int | Sequence[int]) -> torch.Tensor:
    """(B, T) bool: the token is one of the EOS ids (chat models often have several, e.g. <|im_end|>)."""
    ids = torch.as_tensor([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id))
    return torch.isin(tokens, ids.to(tokens.device))


def response_mask(
    tokens: torch.Tensor, eos_token_id: int | Sequence[int], generated: torch.Tensor | None = None
) -> torch.Tensor:
    """(B, T) bool mask of real response tokens: up to and including the first EOS, False after it.

    `tokens`: (B, T) generated response tokens (prompt already removed). `generated`: optional (B, T)
    mask of the positions that hold generated tokens at all — for responses gathered from a ragged
    list and left- or right-padded by the caller. Without it every position counts, which is right for
    `model.generate` output (finished rows are padded after their EOS, unfinished ones are not padded).
    A response that never emits EOS (cut at `max_new_tokens`) is real to its end.
    """
    gen = torch.ones_like(tokens, dtype=torch.bool) if generated is None else generated.bool()
    eos = _is_eos(tokens, eos_token_id) & gen  # (B, T); an EOS-valued pad is not an EOS
    # number of EOS strictly before t; a position is real if generated and no EOS came before it
    eos_before = torch.cumsum(eos.long(), dim=1) - eos.long()  # (B, T)
    return gen & (eos_before == 0)


def contains_eos(tokens: torch.Tensor, eos_token_id: int | Sequence[int], mask: torch.Tensor) -> torch.Tensor:
    """(B,) bool: the response has an EOS among its real tokens (i.e. it ended, was not truncated)."""
    return (_is_eos(tokens, eos_token_id) & mask.bool()).any(dim=1)


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """(B,) int64 index of the last real token of each row, -1 for a row with none.

    Read from the mask (never from token ids), so it is right whatever the pad id and for left or
    right padding.
    """
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)  # (B, T)
    return torch.where(mask.bool(), positions, -1).amax(dim=1)


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, L) position ids that count real tokens only, so left padding does not shift positions.

    Padded positions get 0 (any value works: attention never reads them). This is what `generate`
    computes internally; a plain forward over left-padded sequences needs it passed explicitly to
    give the same log-probs as generation did.
    """
    pos = torch.cumsum(attention_mask.long(), dim=1) - 1  # (B, L)
    return pos.clamp(min=0).masked_fill(~attention_mask.bool(), 0)


def gather_last(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Each row's entry at its last real token: (B, T) or (B, T, 1) -> (B,), (B, T, H) -> (B, H).

    Where a reward model's score or a hidden state is read. A row with no real token reads position 0.
    """
    if values.dim() == 3 and values.shape[-1] == 1:
        values = values.squeeze(-1)
    idx = last_token_index(mask).clamp(min=0)  # (B,)
    return values[torch.arange(values.shape[0], device=values.device), idx]  # (B,) or (B, H)
