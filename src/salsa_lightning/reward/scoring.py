"""The one reward-scoring path, used by PPO and evaluation: a prompt and a response rendered with the chat template
and truncated from the left exactly as the reward stage trained (`encode_for_reward`), scored at the last real
token, optionally normalised with the reward stage's training-set statistics."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from salsa_lightning.data.chat import Messages, conversation, encode_left_truncated
from salsa_lightning.data.collate import length_batches, pad_with_mask
from salsa_lightning.errors import SalsaError
from salsa_lightning.models.loading import ModelSpec, load_tokenizer
from salsa_lightning.reward.model import (
    load_reward_model,
    reward_max_length,
    reward_stats,
    sequence_scores,
)
from salsa_lightning.rl.rewards import normalize_scores


def encode_for_reward(
    tokenizer, prompts: Sequence[str | Messages], responses: Sequence[str], max_length: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, mask), both (B, T) and right-padded: each conversation rendered and left-truncated to `max_length`
    tokens, as `PreferenceDataModule` encodes the reward stage's training pairs."""
    return pad_with_mask(_encoded(tokenizer, prompts, responses, max_length), tokenizer.pad_token_id)


def _encoded(
    tokenizer, prompts: Sequence[str | Messages], responses: Sequence[str], max_length: int
) -> list[list[int]]:
    """Each (prompt, response) rendered and left-truncated to `max_length` tokens (unpadded)."""
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    return [encode_left_truncated(tokenizer, conversation(p, r), max_length)[0] for p, r in zip(prompts, responses)]


class RewardScorer:
    """Batched, no-grad reward scores for (prompt, response) pairs, optionally normalised with the reward
    stage's training-set mean/std."""

    def __init__(self, model, tokenizer, max_length: int = 1024, batch_size: int = 16, stats: dict | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.batch_size = batch_size
        self.stats = stats

    @classmethod
    def from_output(cls, path: str, dtype: str = "auto", device: str | torch.device | None = None, **kwargs):
        spec = ModelSpec(name_or_path=str(path), dtype=dtype)
        tokenizer = load_tokenizer(spec)
        model = load_reward_model(spec, trainable=False, pad_token_id=tokenizer.pad_token_id)
        if device is not None:
            model.to(device)
        kwargs.setdefault("max_length", reward_max_length(path))
        return cls(model, tokenizer, stats=reward_stats(path), **kwargs)

    @torch.no_grad()
    def score(
        self, prompts: Sequence[str | Messages], responses: Sequence[str], normalize: bool = False
    ) -> torch.Tensor:
        if normalize and not (self.stats and self.stats.get("std", 0) > 0):  # (a NaN std fails the test too)
            raise SalsaError(
                "Reward normalisation needs the reward stage's stats with std > 0; re-run the reward stage."
            )
        device = next(self.model.parameters()).device
        seqs = _encoded(self.tokenizer, prompts, responses, self.max_length)
        scores = torch.empty(len(seqs))
        # batches of similar lengths: a batch in input order pads every row to its longest
        for rows in length_batches([len(s) for s in seqs], self.batch_size):
            ids, mask = pad_with_mask([seqs[i] for i in rows], self.tokenizer.pad_token_id)
            scores[rows] = sequence_scores(self.model, ids.to(device), mask.to(device)).float().cpu()
        if normalize:
            scores = normalize_scores(scores, self.stats["mean"], self.stats["std"])
        return scores
