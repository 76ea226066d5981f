"""One evaluation split — a file or Hub dataset of `eval_files` — read into prompts and the items systems answer
(one per user turn), with the text the gold judge reads of each, checked before any model is loaded."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from salsa_lightning.data import judge as gold
from salsa_lightning.data.chat import Messages
from salsa_lightning.data.sources import load_rows
from salsa_lightning.errors import SalsaError
from salsa_lightning.evaluation.config import EvalConfig
from salsa_lightning.evaluation.prompts import EvalPrompt, read_prompt, turn_items


@dataclass
class SplitPrompts:
    source: str
    rows: list[dict[str, Any]]
    prompts: list[EvalPrompt]
    items: list[tuple[int, int]]  # (row, turn) of each response, row by row (`evaluation.prompts.turn_items`)
    texts: list[str]  # each item's user turn: what the gold judge reads

    @property
    def multi_turn(self) -> bool:
        return any(p.followups for p in self.prompts)

    @property
    def messages(self) -> list[Messages]:
        """Each row's first-turn prompt: what a single-turn consumer (the landscape) generates from."""
        return [p.messages for p in self.prompts]


def load_split(cfg: EvalConfig, split: str, need_gold: bool) -> SplitPrompts:
    """The prompts of `cfg.eval_files[split]` (its Hub split from `cfg.hub_splits`, default `test`; its prompt column
    from `cfg.prompt_columns`; the first `cfg.limit` rows); with `need_gold`, every user turn must be one the gold
    judge can parse. A bad file or row is one sentence naming `eval_files.<split>`."""
    source = cfg.eval_files[split]
    try:
        rows = load_rows(source, split=cfg.hub_splits.get(split, "test"))
    except SalsaError as err:
        raise SalsaError(f"eval_files.{split}: {err}") from err
    limit = cfg.limit
    rows = [dict(r) for r in (rows.select(range(min(limit, len(rows)))) if limit else rows)]
    if not rows:
        raise SalsaError(f"The evaluation file {source} ({split}) has no rows; point `eval_files.{split}` at prompts.")
    column = cfg.prompt_columns.get(split)
    try:
        prompts = [read_prompt(r, i, column) for i, r in enumerate(rows)]
    except SalsaError as err:
        raise SalsaError(f"eval_files.{split} ({source}): {err}") from err
    items = turn_items(prompts)
    texts = [
        prompts[row].followups[turn - 1]
        if turn
        else next((m["content"] for m in reversed(prompts[row].messages) if m.get("role") == "user"), "")
        for row, turn in items
    ]
    if need_gold:
        for i, text in enumerate(texts):
            try:
                gold.parse_prompt(text)
            except SalsaError as err:
                raise SalsaError(f"{source} row {i}: {err}") from err
    return SplitPrompts(source, rows, prompts, items, texts)
