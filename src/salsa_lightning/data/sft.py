"""SFT data: conversations (`messages`, the ultrachat_200k format) -> assistant-only-label batches."""

from __future__ import annotations

from typing import Any

from lightning.pytorch.utilities import rank_zero_info

from salsa_lightning.data.base import ScoredDataModule
from salsa_lightning.data.cache import keep_flagged
from salsa_lightning.data.chat import IGNORE_INDEX, tokenize_conversation, validate_messages
from salsa_lightning.data.collate import CausalLMCollator
from salsa_lightning.data.sources import load_rows
from salsa_lightning.errors import SalsaError


def encode_conversations(batch: dict[str, list], indices: list[int], tokenizer, max_length: int, messages_key: str):
    """A `Dataset.map` batch of conversations -> `input_ids`, `labels` and `keep` (some assistant token survived
    truncation: a row without one has nothing to learn from)."""
    out: dict[str, list] = {"input_ids": [], "labels": [], "keep": []}
    for index, messages in zip(indices, batch[messages_key]):
        enc = tokenize_conversation(
            tokenizer, validate_messages({messages_key: messages}, index, messages_key), max_length
        )
        out["input_ids"].append(enc["input_ids"])
        out["labels"].append(enc["labels"])
        out["keep"].append(any(label != IGNORE_INDEX for label in enc["labels"]))
    return out


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
        messages_key: str = "messages",
        num_proc: int = 1,
        cache_dir: str | None = None,
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
            messages_key: The column holding each conversation (a list of `{role, content}`), as OpenRLHF's
                `--input_key`.
            num_proc: Processes that tokenise (`datasets.Dataset.map`).
            cache_dir: Where the tokenised rows are cached; None = next to the loaded rows in the `datasets` cache
                (`HF_DATASETS_CACHE`). A second run with the same data, tokenizer, template and lengths loads them.
        """
        super().__init__()
        self.save_hyperparameters(ignore=["tokenizer"])
        self.check_fields()
        self.tokenizer = tokenizer
        self.train_set = self.val_set = self.test_set = None

    def _tokenized(self, rows, source: str):
        """The `input_ids`/`labels` rows (a `datasets.Dataset`, memory-mapped from the cache) of `rows`."""
        hp = self.hparams
        self.require_columns(rows, source, "messages_key")
        encoded = self.tokenize(
            rows,
            encode_conversations,
            "sft",
            tokenizer=self.tokenizer,
            max_length=hp.max_length,
            messages_key=hp.messages_key,
        )
        out = keep_flagged(encoded)
        dropped = len(encoded) - len(out)
        if dropped:
            rank_zero_info(f"SFT data: dropped {dropped} rows with no assistant token within max_length.")
        return out

    def setup(self, stage: str | None = None) -> None:
        hp = self.hparams
        if stage == "test":
            if self.test_set is None:
                self.require_tokenizer()
                self.test_set = self._tokenized(self.load_limited(hp.data, hp.split, hp.limit), hp.data)
                if len(self.test_set) == 0:
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
        self.train_set = self._tokenized(rows, hp.data)
        self.val_set = self._tokenized(val_rows, hp.data)
        if len(self.train_set) == 0:
            raise SalsaError(f"No SFT row of {hp.data} has an assistant turn within max_length={hp.max_length}.")

    def collator(self) -> CausalLMCollator:
        return CausalLMCollator(self.tokenizer.pad_token_id)
