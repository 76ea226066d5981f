"""What the SFT, preference and prompt data modules share: row loading with a limit, and loaders that resume.

A training loader's order is a function of (seed, epoch) alone and its position is in every checkpoint, so a run
resumed from any checkpoint (mid-epoch or at an epoch's end) sees the very batches an uninterrupted run sees.
torch's `shuffle=True` cannot: its `RandomSampler` draws each epoch's order from the global RNG, whose state a
checkpoint does not hold, and Lightning restarts an interrupted epoch from its first batch unless the loader is
`_Stateful` (`state_dict`/`load_state_dict`, saved by `FitLoop.on_save_checkpoint`).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, DistributedSampler

from salsa_lightning.data.sources import load_rows
from salsa_lightning.errors import SalsaError, require

# the numeric fields the data modules share: (what it must be, the check, a value that works)
_FIELDS = {
    "batch_size": ("at least 1", lambda v: v >= 1, 8),
    "num_workers": (">= 0", lambda v: v >= 0, 0),
    "limit": ("at least 1, or null for every row", lambda v: v is None or v >= 1, "null"),
    "val_fraction": ("in (0, 1)", lambda v: 0 < v < 1, 0.05),
    "max_length": ("at least 1", lambda v: v >= 1, 1024),
    "max_prompt_length": ("at least 1", lambda v: v >= 1, 512),
    "num_proc": ("at least 1", lambda v: v >= 1, 4),
}
# the column-name fields (OpenRLHF's --input_key and friends): the default, and what the column holds
_KEYS = {
    "messages_key": ("messages", "the conversations (message lists)"),
    "prompt_key": ("prompt", "the prompts"),
    "chosen_key": ("chosen", "the preferred responses"),
    "rejected_key": ("rejected", "the rejected responses"),
}


class EpochShuffleSampler(DistributedSampler):
    """Row indices in an order that depends only on (seed, epoch) (Lightning calls `set_epoch`), or in order with
    `shuffle=False`; each process of a distributed run takes its share, as torch's DistributedSampler (padded to an
    equal count). One iteration can start `start` rows into this process's share (`ResumableDataLoader`).

    A DistributedSampler, so that Lightning uses it as it is on several processes: the wrapper it would put around
    another sampler shards that sampler's order but never passes `set_epoch` on, so every epoch would repeat the
    first one's order."""

    def __init__(self, n: int, seed: int = 0, shuffle: bool = True):
        initialized = torch.distributed.is_available() and torch.distributed.is_initialized()
        replicas, rank = (torch.distributed.get_world_size(), torch.distributed.get_rank()) if initialized else (1, 0)
        super().__init__(range(n), num_replicas=replicas, rank=rank, shuffle=shuffle, seed=seed)
        self.n, self.start = n, 0

    def __iter__(self) -> Iterator[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        order += order[: self.total_size - self.n]  # pad so that every process gets as many rows (one process: none)
        share = order[self.rank : self.total_size : self.num_replicas]
        start, self.start = self.start, 0  # only the first iteration after a resume skips
        return iter(share[start:])


class ResumableDataLoader(DataLoader):
    """A DataLoader that Lightning checkpoints: how many batches of the current epoch it has handed out. On resume
    mid-epoch it continues after them (in the sampler's order, without loading them), instead of from the first.

    Counted here, not in the sampler: worker processes draw indices ahead of the batches that were trained on."""

    _done = 0  # batches handed out in the current epoch
    _skip = 0  # batches the next iteration skips (a restored position)

    def state_dict(self) -> dict[str, int]:
        return {"batches": self._done}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._skip = int(state.get("batches", 0))

    def epoch_ends_after(self, batches: int) -> None:
        """Lightning ends each epoch after `batches` (fewer than `len(self)` under `limit_train_batches`): a restored
        position there (a checkpoint after an epoch's last batch) is the start of the next epoch, not a skip."""
        if self._skip >= batches:
            self._skip = 0

    def __iter__(self) -> Iterator[Any]:
        # a generator: the body runs at the first batch, after Lightning has restored the state and set the epoch
        skip, self._skip = self._skip, 0
        fast = isinstance(self.sampler, EpochShuffleSampler)
        if fast:
            self.sampler.start = skip * self.batch_size
        batches = super().__iter__()
        if not fast:  # a sampler we did not build (Lightning's distributed wrapper): draw the batches and drop them
            for _ in itertools.islice(batches, skip):
                pass
        self._done = skip
        for batch in batches:
            self._done += 1
            yield batch


class TokenizedDataModule(L.LightningDataModule):
    """Holds `tokenizer` (linked from the model by the CLI), a `train_set` (a `datasets.Dataset` of tokenised rows,
    memory-mapped from the tokenisation cache, so each rank and loader worker shares the pages) and a collator."""

    what = "data"  # how error messages name this module's data

    def check_fields(self) -> None:
        """Refuse bad numeric settings when the config is parsed, not when a loader first uses them."""
        for name, (wanted, ok, example) in _FIELDS.items():
            if name in self.hparams:
                value = self.hparams[name]
                require(
                    isinstance(value, (int, float, type(None))) and ok(value), f"data.{name}", value, wanted, example
                )
        for name, (default, _) in _KEYS.items():
            if name in self.hparams:
                value = self.hparams[name]
                require(isinstance(value, str) and value != "", f"data.{name}", value, "a column name", f'"{default}"')
        if "chosen_key" in self.hparams and "rejected_key" in self.hparams:
            chosen, rejected = self.hparams.chosen_key, self.hparams.rejected_key
            require(
                chosen != rejected, "data.rejected_key", rejected, "another column than `data.chosen_key`", '"rejected"'
            )

    def require_columns(self, rows, source: str, *options: str) -> None:
        """Refuse `rows` of `source` that lack the column named by one of `options` (`messages_key`, ...), before any
        tokenising: one sentence naming the columns found and the option to set."""
        for option in options:
            column = self.hparams[option]
            if column not in rows.column_names:
                raise SalsaError(
                    f"The {self.what} {source} has no column `{column}` (its columns: {', '.join(rows.column_names)}); "
                    f"set `data.{option}` to the column that holds {_KEYS[option][1]}."
                )

    def cache_key(self, *modules) -> list:
        """What, besides the rows, changes this module's tokens: the tokenizer and its chat template, the code that
        tokenises (`modules`), the local data files, and every length and column setting (`cache.cached_map`)."""
        from salsa_lightning.data import cache

        settings = {k: v for k, v in self.hparams.items() if k.startswith("max_") or k in _KEYS}
        return [
            type(self).__name__,
            cache.tokenizer_fingerprint(self.tokenizer),
            cache.code_fingerprint(cache, *modules),
            [cache.source_fingerprint(self.hparams[k]) for k in ("data", "val_data") if self.hparams.get(k)],
            sorted(settings.items()),
        ]

    def tokenize(self, rows, encode: Callable[..., dict[str, list]], name: str, **fn_kwargs):
        """`rows` through `encode(batch, indices, **fn_kwargs)`, cached (`cache.cached_map`); the module defining
        `encode` and `chat` (the chat-template tokenisation) are its code."""
        import sys

        from salsa_lightning.data import chat
        from salsa_lightning.data.cache import cached_map

        key = self.cache_key(chat, sys.modules[encode.__module__])
        hp = self.hparams
        return cached_map(rows, encode, fn_kwargs, key, name=name, num_proc=hp.num_proc, cache_dir=hp.cache_dir)

    def require_tokenizer(self) -> None:
        if self.tokenizer is None:
            raise SalsaError(
                f"{type(self).__name__} has no tokenizer; pass `tokenizer=` (the CLI links it from the model)."
            )

    def load_limited(self, data: str, split: str, limit: int | None):
        """Rows of `data`, the first `limit` of them, refusing an empty source."""
        rows = load_rows(data, split)
        if limit is not None:
            rows = rows.select(range(min(limit, len(rows))))
        if len(rows) == 0:
            raise SalsaError(f"The {self.what} {data} has no rows; point `data.data` at a non-empty dataset.")
        return rows

    def collator(self) -> Callable[[list[dict[str, Any]]], dict[str, Any]]:
        raise NotImplementedError

    def _loader(self, rows, shuffle: bool) -> DataLoader:
        return DataLoader(
            rows,
            batch_size=self.hparams.batch_size,
            shuffle=shuffle,
            num_workers=self.hparams.num_workers,
            collate_fn=self.collator(),
        )

    def train_dataloader(self) -> DataLoader:
        from salsa_lightning.seeding import current_seed

        # the order follows `--seed_everything` (SFT seeds differ in it), as torch's shuffle did, but reproducibly
        return ResumableDataLoader(
            self.train_set,
            batch_size=self.hparams.batch_size,
            sampler=EpochShuffleSampler(len(self.train_set), seed=current_seed() or 0),
            num_workers=self.hparams.num_workers,
            collate_fn=self.collator(),
        )


class ScoredDataModule(TokenizedDataModule):
    """Data a stage can be scored on: a held-out `val_set` (`fit` and `validate`) and a `test_set` (`test`: every row
    of the source). Prompt data has neither, so that Lightning has no validation loop to skip (and warn about)."""

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, shuffle=False)
