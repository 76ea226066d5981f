"""Preference pairs (`prompt`, `chosen`, `rejected`; the ultrafeedback_binarized format) for reward modelling.

`chosen`/`rejected` may be strings (the response alone) or message lists (the whole conversation, as
in ultrafeedback_binarized); `prompt` may be a string or a message list. Each side is rendered with
the chat template, and truncated from the LEFT so the response end — where the reward is read — survives.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

from salsa_lightning.data.base import ScoredDataModule
from salsa_lightning.data.chat import conversation, encode_left_truncated, last_assistant_text
from salsa_lightning.data.collate import pad_sequences
from salsa_lightning.data.sources import load_rows
from salsa_lightning.errors import SalsaError


def validate_pair(row: dict[str, Any], index: int) -> None:
    for key in ("chosen", "rejected"):
        if row.get(key) is None:
            raise SalsaError(
                f"Preference row {index} has no `{key}`; rows need `prompt`, `chosen` and `rejected` "
                "(strings or message lists)."
            )
    if row.get("prompt") is None and (isinstance(row["chosen"], str) or isinstance(row["rejected"], str)):
        raise SalsaError(f"Preference row {index} has string responses but no `prompt`; add the prompt column.")


def encode_pairs(rows, tokenizer, max_length: int) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Tokenised pairs, and counts of what was dropped or truncated (reported, never silent)."""
    out, counts = [], {"identical_dropped": 0, "truncated": 0}
    for i, row in enumerate(rows):
        validate_pair(row, i)
        if last_assistant_text(row["chosen"]).strip() == last_assistant_text(row["rejected"]).strip():
            counts["identical_dropped"] += 1  # no preference signal, and a zero-margin pair only adds noise
            continue
        prompt = row.get("prompt") or ""
        chosen, t1 = encode_left_truncated(tokenizer, conversation(prompt, row["chosen"]), max_length)
        rejected, t2 = encode_left_truncated(tokenizer, conversation(prompt, row["rejected"]), max_length)
        counts["truncated"] += int(t1 or t2)
        item = {"chosen_ids": chosen, "rejected_ids": rejected}
        if row.get("margin") is not None:
            item["margin"] = float(row["margin"])
        out.append(item)
    if counts["identical_dropped"]:
        warnings.warn(
            f"Dropped {counts['identical_dropped']} preference pairs whose chosen and rejected are identical."
        )
    return out, counts


class PairCollator:
    """One batch = chosen rows then rejected rows, right-padded, so both go through ONE forward pass."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        seqs = [r["chosen_ids"] for r in rows] + [r["rejected_ids"] for r in rows]
        batch = {
            "input_ids": pad_sequences(seqs, self.pad_token_id),  # (2B, T)
            "attention_mask": pad_sequences([[1] * len(s) for s in seqs], 0),  # (2B, T)
        }
        if all("margin" in r for r in rows):
            batch["margin"] = torch.tensor([r["margin"] for r in rows])
        return batch


class PreferenceDataModule(ScoredDataModule):
    """Preference pairs from a Hub dataset or local JSON/JSONL/Parquet.

    `fit` and `validate` score `val_data` (or the held-out rows); `test` scores every pair of `data` (`split`,
    `limit`), so point `data.data` at the preference file to measure the accuracy on."""

    what = "preference data"

    def __init__(
        self,
        data: str,
        tokenizer: Any = None,
        split: str = "train_prefs",
        val_data: str | None = None,
        val_split: str | None = "test_prefs",
        val_fraction: float = 0.05,
        max_length: int = 1024,
        batch_size: int = 8,
        num_workers: int = 0,
        limit: int | None = None,
        split_seed: int = 0,
    ):
        """
        Args:
            data: Hub dataset (e.g. HuggingFaceH4/ultrafeedback_binarized) or local .json/.jsonl/.parquet.
            tokenizer: Set by the CLI from the model (a linked argument); pass one when using this class directly.
            split: Hub split for training.
            val_data: Separate validation source (local file or Hub name); None = same source as `data`.
            val_split: Hub split for validation; for local `data` without `val_data`, `val_fraction` is held out.
            val_fraction: Share of rows held out for validation when there is no validation split.
            max_length: Each side is truncated from the left to this many tokens (the reward is read at the end).
            batch_size: Pairs per batch (each pair is two sequences).
            num_workers: DataLoader worker processes.
            limit: Use only the first `limit` training rows.
            split_seed: Seed of the held-out split.
        """
        super().__init__()
        self.save_hyperparameters(ignore=["tokenizer"])
        self.check_fields()
        self.tokenizer = tokenizer
        self.train_set = self.val_set = self.test_set = None
        self.counts: dict[str, int] = {}

    def setup(self, stage: str | None = None) -> None:
        hp = self.hparams
        if stage == "test":
            if self.test_set is None:
                self.require_tokenizer()
                rows = self.load_limited(hp.data, hp.split, hp.limit)
                self.test_set, counts = encode_pairs(rows, self.tokenizer, hp.max_length)
                self.counts = {f"test_{k}": v for k, v in counts.items()}
                if not self.test_set:
                    raise SalsaError(f"Every preference pair in {hp.data} has chosen == rejected; nothing to score.")
            return
        if self.train_set is not None:
            return
        self.require_tokenizer()
        rows = self.load_limited(hp.data, hp.split, hp.limit)
        local = hp.val_data is None and not _is_hub(hp.data)
        if hp.val_data is not None:
            val_rows = load_rows(hp.val_data, hp.val_split or "train")
        elif local or hp.val_split is None:
            parts = rows.train_test_split(test_size=hp.val_fraction, seed=hp.split_seed)
            rows, val_rows = parts["train"], parts["test"]
        else:
            val_rows = load_rows(hp.data, hp.val_split)
        self.train_set, train_counts = encode_pairs(rows, self.tokenizer, hp.max_length)
        self.val_set, val_counts = encode_pairs(val_rows, self.tokenizer, hp.max_length)
        self.counts = {f"train_{k}": v for k, v in train_counts.items()} | {
            f"val_{k}": v for k, v in val_counts.items()
        }
        if not self.train_set:
            raise SalsaError(f"Every preference pair in {hp.data} has chosen == rejected; nothing to learn from.")

    def collator(self) -> PairCollator:
        return PairCollator(self.tokenizer.pad_token_id)


def _is_hub(source: str) -> bool:
    from pathlib import Path

    return not Path(source).expanduser().exists()
