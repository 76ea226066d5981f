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
from salsa_lightning.data.cache import flags, keep_flagged
from salsa_lightning.data.chat import conversation, encode_left_truncated, last_assistant_text
from salsa_lightning.data.collate import pad_sequences
from salsa_lightning.data.sources import load_rows
from salsa_lightning.errors import SalsaError

PairKeys = tuple[str, str, str] | None  # the (prompt, chosen, rejected) column names; None = the defaults
PAIR_KEYS = ("prompt", "chosen", "rejected")


def validate_pair(row: dict[str, Any], index: int, keys: PairKeys = None) -> None:
    prompt_key, chosen_key, rejected_key = keys or PAIR_KEYS
    for key in (chosen_key, rejected_key):
        if row.get(key) is None:
            raise SalsaError(
                f"Preference row {index} has no `{key}`; rows need `{prompt_key}`, `{chosen_key}` and `{rejected_key}` "
                "(strings or message lists)."
            )
    if row.get(prompt_key) is None and (isinstance(row[chosen_key], str) or isinstance(row[rejected_key], str)):
        raise SalsaError(
            f"Preference row {index} has string responses but no `{prompt_key}`; add the prompt column "
            "(or set `data.prompt_key` to it)."
        )


def encode_pair(row: dict[str, Any], index: int, tokenizer, max_length: int, keys: PairKeys = None):
    """One pair's `chosen_ids` and `rejected_ids` and whether a side was truncated, or None for a pair whose chosen
    and rejected responses are identical (no preference signal, and a zero-margin pair only adds noise)."""
    prompt_key, chosen_key, rejected_key = keys or PAIR_KEYS
    validate_pair(row, index, keys)
    if last_assistant_text(row[chosen_key]).strip() == last_assistant_text(row[rejected_key]).strip():
        return None
    prompt = row.get(prompt_key) or ""
    chosen, t1 = encode_left_truncated(tokenizer, conversation(prompt, row[chosen_key]), max_length)
    rejected, t2 = encode_left_truncated(tokenizer, conversation(prompt, row[rejected_key]), max_length)
    return chosen, rejected, t1 or t2


def encode_pair_batch(
    batch: dict[str, list], indices: list[int], tokenizer, max_length: int, keys: tuple[str, str, str]
):
    """A `Dataset.map` batch of pairs -> `chosen_ids`, `rejected_ids`, `truncated`, `keep` (False for identical
    sides) and `margin` where the rows have one."""
    out: dict[str, list] = {"chosen_ids": [], "rejected_ids": [], "truncated": [], "keep": []}
    if "margin" in batch:
        out["margin"] = [None if m is None else float(m) for m in batch["margin"]]
    for j, index in enumerate(indices):
        enc = encode_pair({k: v[j] for k, v in batch.items()}, index, tokenizer, max_length, keys)
        chosen, rejected, truncated = enc or ([], [], False)
        out["chosen_ids"].append(chosen)
        out["rejected_ids"].append(rejected)
        out["truncated"].append(truncated)
        out["keep"].append(enc is not None)
    return out


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
        if all(r.get("margin") is not None for r in rows):
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
        prompt_key: str = "prompt",
        chosen_key: str = "chosen",
        rejected_key: str = "rejected",
        num_proc: int = 1,
        cache_dir: str | None = None,
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
            prompt_key: The column holding the prompt (string or messages; optional when both sides are whole
                conversations), as OpenRLHF's `--prompt_key`.
            chosen_key: The column holding the preferred response (string or messages).
            rejected_key: The column holding the rejected response (string or messages).
            num_proc: Processes that tokenise (`datasets.Dataset.map`).
            cache_dir: Where the tokenised pairs are cached; None = next to the loaded rows in the `datasets` cache
                (`HF_DATASETS_CACHE`). A second run with the same data, tokenizer, template and lengths loads them.
        """
        super().__init__()
        self.save_hyperparameters(ignore=["tokenizer"])
        self.check_fields()
        self.tokenizer = tokenizer
        self.train_set = self.val_set = self.test_set = None
        self.counts: dict[str, int] = {}

    def _encode(self, rows, source: str):
        """The tokenised pairs of `rows` (a `datasets.Dataset`, memory-mapped from the cache), and counts of what was
        dropped or truncated (reported, never silent)."""
        from datasets import Value

        hp = self.hparams
        self.require_columns(rows, source, "chosen_key", "rejected_key")
        sides = [rows.features[k] for k in (hp.chosen_key, hp.rejected_key)]
        if hp.prompt_key not in rows.column_names and any(isinstance(f, Value) for f in sides):
            self.require_columns(rows, source, "prompt_key")  # responses alone need their prompt; conversations not
        keys = (hp.prompt_key, hp.chosen_key, hp.rejected_key)
        encoded = self.tokenize(
            rows,
            encode_pair_batch,
            "preferences",
            tokenizer=self.tokenizer,
            max_length=hp.max_length,
            keys=keys,
        )
        pairs = keep_flagged(encoded)  # (a dropped pair is never counted as truncated: it was not tokenised)
        counts = {"identical_dropped": len(encoded) - len(pairs), "truncated": int(flags(encoded, "truncated").sum())}
        if counts["identical_dropped"]:
            warnings.warn(
                f"Dropped {counts['identical_dropped']} preference pairs whose chosen and rejected are identical."
            )
        return pairs, counts

    def setup(self, stage: str | None = None) -> None:
        hp = self.hparams
        if stage == "test":
            if self.test_set is None:
                self.require_tokenizer()
                rows = self.load_limited(hp.data, hp.split, hp.limit)
                self.test_set, counts = self._encode(rows, hp.data)
                self.counts = {f"test_{k}": v for k, v in counts.items()}
                if len(self.test_set) == 0:
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
        self.train_set, train_counts = self._encode(rows, hp.data)
        self.val_set, val_counts = self._encode(val_rows, hp.val_data or hp.data)
        self.counts = {f"train_{k}": v for k, v in train_counts.items()} | {
            f"val_{k}": v for k, v in val_counts.items()
        }
        if len(self.train_set) == 0:
            raise SalsaError(f"Every preference pair in {hp.data} has chosen == rejected; nothing to learn from.")

    def collator(self) -> PairCollator:
        return PairCollator(self.tokenizer.pad_token_id)


def _is_hub(source: str) -> bool:
    from pathlib import Path

    return not Path(source).expanduser().exists()
