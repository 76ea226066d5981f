"""RL prompts (`prompt` string/messages, or `messages` whose first assistant turn is dropped), left-padded
for batched generation and truncated from the LEFT when longer than `max_prompt_length` (counted)."""

from __future__ import annotations

import warnings
from typing import Any

from torch.utils.data import DataLoader

from salsa_lightning.data.base import EpochShuffleSampler, ResumableDataLoader, TokenizedDataModule
from salsa_lightning.data.cache import flags
from salsa_lightning.data.chat import Messages, as_messages
from salsa_lightning.data.collate import pad_sequences
from salsa_lightning.errors import SalsaError


def prompt_messages(
    row: dict[str, Any], index: int, prompt_key: str = "prompt", messages_key: str = "messages"
) -> Messages:
    """The prompt of `row`: its `prompt_key` (a string or messages), else the turns of `messages_key` before the first
    assistant turn."""
    if row.get(prompt_key) is not None:
        return as_messages(row[prompt_key])
    messages = row.get(messages_key)
    if isinstance(messages, list) and messages:
        head = []
        for m in messages:
            if m.get("role") == "assistant":
                break
            head.append(m)
        if head:
            return head
    raise SalsaError(
        f"RL prompt row {index} has neither `{prompt_key}` nor a `{messages_key}` list with a user turn; fix that row."
    )


def encode_prompts(
    batch: dict[str, list], indices: list[int], tokenizer, max_prompt_length: int, keys: tuple[str, str]
):
    """A `Dataset.map` batch of prompt rows -> `input_ids` (the chat template with the generation prompt, cut from the
    left to `max_prompt_length`), `messages` and `truncated`."""
    out: dict[str, list] = {"input_ids": [], "messages": [], "truncated": []}
    for j, index in enumerate(indices):
        messages = prompt_messages({k: batch[k][j] for k in keys if k in batch}, index, *keys)
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        out["input_ids"].append(ids[-max_prompt_length:])
        out["messages"].append(messages)
        out["truncated"].append(len(ids) > max_prompt_length)
    return out


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
        prompt_key: str = "prompt",
        messages_key: str = "messages",
        num_proc: int = 1,
        cache_dir: str | None = None,
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
            prompt_key: The column holding the prompt (a string or messages), as OpenRLHF's `--input_key`.
            messages_key: The column of conversations used where `prompt_key` is absent or null (the turns before
                the first assistant turn).
            num_proc: Processes that tokenise (`datasets.Dataset.map`).
            cache_dir: Where the tokenised prompts are cached; None = next to the loaded rows in the `datasets` cache
                (`HF_DATASETS_CACHE`). A second run with the same data, tokenizer, template and length loads them.
        """
        super().__init__()
        self.save_hyperparameters(ignore=["tokenizer"])
        self.check_fields()
        self.tokenizer = tokenizer
        self.rows = None  # a `datasets.Dataset` of `input_ids` and `messages` after `setup`
        self.truncated = 0

    def setup(self, stage: str | None = None) -> None:
        if self.rows is not None:
            return
        self.require_tokenizer()
        hp = self.hparams
        rows = self.load_limited(hp.data, hp.split, hp.limit)
        keys = (hp.prompt_key, hp.messages_key)
        if not any(k in rows.column_names for k in keys):
            raise SalsaError(
                f"The prompt data {hp.data} has neither a `{hp.prompt_key}` nor a `{hp.messages_key}` column (its "
                f"columns: {', '.join(rows.column_names)}); set `data.prompt_key` (or `data.messages_key`) to the "
                "column that holds the prompts."
            )
        encoded = self.tokenize(
            rows,
            encode_prompts,
            "prompts",
            tokenizer=self.tokenizer,
            max_prompt_length=hp.max_prompt_length,
            keys=keys,
        )
        self.truncated = int(flags(encoded, "truncated").sum())
        self.rows = encoded.remove_columns("truncated")
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
