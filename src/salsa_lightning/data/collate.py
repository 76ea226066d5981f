"""Dynamic padding: each batch is padded to its own longest row, not to `max_length`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from salsa_lightning.data.chat import IGNORE_INDEX


def pad_sequences(seqs: list[list[int]], value: int, side: str = "right") -> torch.Tensor:
    """(B, T) long tensor of `seqs` padded with `value` on `side` to the longest row (torch's `pad_sequence`)."""
    from torch.nn.utils.rnn import pad_sequence

    return pad_sequence(
        [torch.tensor(s, dtype=torch.long) for s in seqs], batch_first=True, padding_value=value, padding_side=side
    )


def pad_with_mask(seqs: list[list[int]], pad_id: int, side: str = "right") -> tuple[torch.Tensor, torch.Tensor]:
    """`seqs` padded with `pad_id`, and the (B, T) attention mask of their real tokens."""
    return pad_sequences(seqs, pad_id, side), pad_sequences([[1] * len(s) for s in seqs], 0, side)


def length_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Row indices in batches of `batch_size` by length, longest first (ties in input order): rows of similar
    lengths pad little, and the first batch shows at once whether the largest one fits in memory."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return [order[s : s + batch_size] for s in range(0, len(order), batch_size)]


class CausalLMCollator:
    """Pads `input_ids` with the pad id, `labels` with IGNORE_INDEX; the attention mask marks real tokens."""

    def __init__(self, pad_token_id: int, side: str = "right"):
        self.pad_token_id = pad_token_id
        self.side = side

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        ids = [r["input_ids"] for r in rows]
        return {
            "input_ids": pad_sequences(ids, self.pad_token_id, self.side),
            "attention_mask": pad_sequences([[1] * len(s) for s in ids], 0, self.side),
            "labels": pad_sequences([r["labels"] for r in rows], IGNORE_INDEX, self.side),
        }
