"""SFT data: conversations (`messages`, the ultrachat_200k format) -> assistant-only-label batches."""

from __future__ import annotations

from typing import Any

from lightning.pytorch.utilities import rank_zero_info

from salsa_lightning.data.base import ScoredDataModule
from salsa_lightning.data.chat import IGNORE_INDEX, tokenize_conversation, validate_messages
from salsa_lightning.data.collate import CausalLMCollator
from salsa_lightning.data.sources import load_rows
from salsa_lightning.errors import SalsaError


class SFTDataModule(ScoredDataModule):
    """Conversations from a Hub dataset or local JSON/JSONL/Parquet, tokenised with the chat template.

    `fit` and `validate` hold `val_fraction` (or `val_split`) out; `test` scores every row of `data` (`split`,
    `limit`), so point `data.data` at the conversations to measure the perplexity on."""

    what = "SFT data"

    def __init__(
        self,
        data: str,
        tokenizer: Any = None,
        split: str = "train_sft",
        val_split: str | None = None,
        val_fraction: float = 0.05,
        max_length: int = 2048,
        batch_size: int = 8,
        num_workers: int = 0,
        limit: int | None = None,
        split_seed: int = 0,
    ):
        """
        Args:
            data: Hub dataset name (e.g. HuggingFaceH4/ultrachat_200k) or local .json/.jsonl/.parquet file or directory.
            tokenizer: Set by the CLI from the model (a linked argument); pass one when using this class directly.
            split: Hub split for training (local files have one split).
            val_split: Hub split for validation (e.g. test_sft); None carves `val_fraction` out of the training rows.
            val_fraction: Share of rows held out for validation when `val_split` is None.
            max_length: Conversations are truncated to this many tokens.
            batch_size: Rows per batch (per device).
            num_workers: DataLoader worker processes.
            limit: Use only the first `limit` rows (quick runs).
            split_seed: Seed of the train/validation split; fixed apart from `--seed_everything`, so that
                SFT seeds differ in training randomness but see the same held-out rows.
        """
        super().__init__()
        self.save_hyperparameters(ignore=["tokenizer"])
        self.check_fields()
        self.tokenizer = tokenizer
        self.train_set = self.val_set = self.test_set = None

    def _tokenized(self, rows) -> list[dict[str, Any]]:
        out, dropped = [], 0
        for i, row in enumerate(rows):
            enc = tokenize_conversation(self.tokenizer, validate_messages(row, i), self.hparams.max_length)
            if all(label == IGNORE_INDEX for label in enc["labels"]):
                dropped += 1  # no assistant token survived truncation: nothing to learn from
                continue
            out.append(enc)
        if dropped:
            rank_zero_info(f"SFT data: dropped {dropped} rows with no assistant token within max_length.")
        return out

    def setup(self, stage: str | None = None) -> None:
        hp = self.hparams
        if stage == "test":
            if self.test_set is None:
                self.require_tokenizer()
                self.test_set = self._tokenized(self.load_limited(hp.data, hp.split, hp.limit))
                if not self.test_set:
                    raise SalsaError(
                        f"No SFT row of {hp.data} has an assistant turn within max_length={hp.max_length}."
                    )
            return
        if self.train_set is not None:
            return
        self.require_tokenizer()
        rows = self.load_limited(hp.data, hp.split, hp.limit)
        if hp.val_split is not None:
            val_rows = load_rows(hp.data, hp.val_split)
        else:
            if len(rows) < 2:
                raise SalsaError(f"The SFT data {hp.data} has one row; a validation split needs at least two.")
            parts = rows.train_test_split(test_size=hp.val_fraction, seed=hp.split_seed)
            rows, val_rows = parts["train"], parts["test"]
        self.train_set = self._tokenized(rows)
        self.val_set = self._tokenized(val_rows)
        if not self.train_set:
            raise SalsaError(f"No SFT row of {hp.data} has an assistant turn within max_length={hp.max_length}.")

    def collator(self) -> CausalLMCollator:
        return CausalLMCollator(self.tokenizer.pad_token_id)
