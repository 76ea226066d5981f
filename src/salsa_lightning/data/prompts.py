"""RL prompts (`prompt` string/messages, or `messages` whose first assistant turn is dropped), left-padded
for batched generation and truncated from the LEFT when longer than `max_prompt_length` (counted)."""

from __future__ import annotations

import warnings
from typing import Any

from torch.utils.data import DataLoader

from salsa_lightning.data.base import EpochShuffleSampler, ResumableDataLoader, TokenizedDataModule
from salsa_lightning.data.chat import Messages, as_messages
from salsa_lightning.data.collate import pad_sequences
from salsa_lightning.errors import SalsaError


def prompt_messages(row: dict[str, Any], index: int) -> Messages:
    if row.get("prompt") is not None:
        return as_messages(row["prompt"])
    messages = row.get("messages")
    if isinstance(messages, list) and messages:
        head = []
        for m in messages:
            if m.get("role") == "assistant":
                break
            head.append(m)
        if head:
            return head
    raise SalsaError(
        f"RL prompt row {index} has neither `prompt` nor a `messages` list with a user turn; fix that row."
    )


class PromptCollator:
    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        ids = [r["input_ids"] for r in rows]
        return {
            "input_ids": pad_sequences(ids, self.pad_token_id, side="left"),  # (B, P)
            "attention_mask": pad_sequences([[1] * len(s) for s in ids], 0, side="left"),  # (B, P)
            "messages": [r["messages"] for r in rows],
        }


class PromptDataModule(TokenizedDataModule):
    """Prompts for PPO rollouts."""

    what = "prompt data"

    def __init__(
        self,
        data: str,
        tokenizer: Any = None,
        split: str = "train",
        max_prompt_length: int = 512,
        batch_size: int = 8,
        limit: int | None = None,
        shuffle_seed: int = 0,
        num_workers: int = 0,
    ):
        """
        Args:
            data: Hub dataset or local .json/.jsonl/.parquet with `prompt` (or `messages`) rows.
            tokenizer: Set by the CLI from the policy (a linked argument).
            split: Hub split.
            max_prompt_length: Longer prompts keep their last tokens (the question usually ends the prompt); counted.
            batch_size: Prompts per PPO rollout (per device).
            limit: Use only the first `limit` prompts.
            shuffle_seed: Seed of the per-epoch prompt order.
            num_workers: DataLoader worker processes.
        """
        super().__init__()
        self.save_hyperparameters(ignore=["tokenizer"])
        self.check_fields()
        self.tokenizer = tokenizer
        self.rows: list[dict[str, Any]] | None = None
        self.truncated = 0

    def setup(self, stage: str | None = None) -> None:
        if self.rows is not None:
            return
        self.require_tokenizer()
        hp = self.hparams
        rows = self.load_limited(hp.data, hp.split, hp.limit)
        self.rows, self.truncated = [], 0
        for i, row in enumerate(rows):
            messages = prompt_messages(row, i)
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            if len(ids) > hp.max_prompt_length:
                self.truncated += 1
                ids = ids[-hp.max_prompt_length :]
            self.rows.append({"input_ids": ids, "messages": messages})
        if self.truncated:
            warnings.warn(
                f"{self.truncated} prompts were longer than max_prompt_length={hp.max_prompt_length}; kept their ends."
            )

    def train_dataloader(self) -> DataLoader:
        return ResumableDataLoader(
            self.rows,
            batch_size=self.hparams.batch_size,
            sampler=EpochShuffleSampler(len(self.rows), self.hparams.shuffle_seed),
            drop_last=True,
            num_workers=self.hparams.num_workers,
            collate_fn=PromptCollator(self.tokenizer.pad_token_id),
        )
