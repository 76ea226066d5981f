"""What the SFT, preference and prompt data modules share: row loading with a limit, and loaders."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning as L
from torch.utils.data import DataLoader

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
}


class TokenizedDataModule(L.LightningDataModule):
    """Holds `tokenizer` (linked from the model by the CLI), a `train_set` list and a collator."""

    what = "data"  # how error messages name this module's data

    def check_fields(self) -> None:
        """Refuse bad numeric settings when the config is parsed, not when a loader first uses them."""
        for name, (wanted, ok, example) in _FIELDS.items():
            if name in self.hparams:
                value = self.hparams[name]
                require(
                    isinstance(value, (int, float, type(None))) and ok(value), f"data.{name}", value, wanted, example
                )

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
        return self._loader(self.train_set, shuffle=True)


class ScoredDataModule(TokenizedDataModule):
    """Data a stage can be scored on: a held-out `val_set` (`fit` and `validate`) and a `test_set` (`test`: every row
    of the source). Prompt data has neither, so that Lightning has no validation loop to skip (and warn about)."""

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, shuffle=False)
