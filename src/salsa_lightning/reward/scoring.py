"""The scoring API used by PPO and evaluation: `RewardScorer.score(prompts, responses) -> (N,) tensor`."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from salsa_lightning.data.chat import Messages, conversation, encode_left_truncated
from salsa_lightning.data.collate import pad_sequences
from salsa_lightning.models.loading import ModelSpec, load_tokenizer
from salsa_lightning.reward.model import load_reward_model, reward_stats, sequence_scores


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
        return cls(model, tokenizer, stats=reward_stats(path), **kwargs)

    @torch.no_grad()
    def score(
        self, prompts: Sequence[str | Messages], responses: Sequence[str], normalize: bool = False
    ) -> torch.Tensor:
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        device = next(self.model.parameters()).device
        out = []
        for start in range(0, len(prompts), self.batch_size):
            seqs = [
                encode_left_truncated(self.tokenizer, conversation(p, r), self.max_length)[0]
                for p, r in zip(prompts[start : start + self.batch_size], responses[start : start + self.batch_size])
            ]
            ids = pad_sequences(seqs, self.tokenizer.pad_token_id).to(device)  # (b, T)
            mask = pad_sequences([[1] * len(s) for s in seqs], 0).to(device)  # (b, T)
            out.append(sequence_scores(self.model, ids, mask).cpu())
        scores = torch.cat(out) if out else torch.empty(0)
        if normalize:
            if not self.stats:
                from salsa_lightning.errors import SalsaError

                raise SalsaError("Reward normalisation needs the reward stage's stats; re-run the reward stage.")
            scores = (scores - self.stats["mean"]) / max(self.stats["std"], 1e-6)
        return scores
