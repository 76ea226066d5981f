"""Dynamic padding: each batch is padded to its own longest row, not to `max_length`."""

from __future__ import annotations

from typing import Any

import torch

from salsa_lightning.data.chat import IGNORE_INDEX


def pad_sequences(seqs: list[list[int]], value: int, side: str = "right") -> torch.Tensor:
    width = max(len(s) for s in seqs)
    out = torch.full((len(seqs), width), value, dtype=torch.long)  # (B, T)
    for i, s in enumerate(seqs):
        if s:
            if side == "right":
                out[i, : len(s)] = torch.tensor(s)
            else:
                out[i, width - len(s) :] = torch.tensor(s)
    return out


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
