"""The llm judge over the landscape: each point's response to each prompt against the reference point's
(`llm_reference`: seed 1 by default) — both orders asked, a tie when they disagree (`evaluation.llm_judge`) — all
points in one pool of requests. The verdicts go into each `PointRun.llm`, one judgement per prompt into
judgements.jsonl (which, with both orders' replies, is the judge's cache for a re-run and for `cache_dir`).

The reference itself is not asked about: its responses against themselves are one request shown both ways, which
combines into a tie whatever the judge replies, so its verdicts are n ties and its value ½ by definition.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from rich.console import Console

from salsa_lightning.evaluation.judging import judge_with_progress, warn_if_unusable
from salsa_lightning.evaluation.llm_judge import LLMJudge, comparison, read_cache
from salsa_lightning.landscape.points import PointRun


def judge_points(
    judge: LLMJudge, messages: list, runs: list[PointRun], reference: str, console: Console
) -> list[dict[str, Any]]:
    """`run.llm` for every run: its responses against those of the run labelled `reference`, prompt by prompt
    (`messages`: each prompt's conversation). Returns the judgements.jsonl records (the reference has none).

    Warns when no point got a single usable verdict (a wrong judge model, template or endpoint); the points'
    llm scores are then None, their verdicts counted as unparseable or failed.
    """
    ref = next(r for r in runs if r.point.label == reference)
    others = [r for r in runs if r is not ref]
    n = len(messages)
    comparisons = [comparison(m, run.texts[i], m, ref.texts[i]) for run in others for i, m in enumerate(messages)]
    judged = judge_with_progress(judge, comparisons, console)
    warn_if_unusable(judged, f"any point against {reference}", console)
    records = []
    for k, run in enumerate(others):
        js = judged[k * n : (k + 1) * n]  # this point's n comparisons
        run.llm = [j.verdict for j in js]
        where = {"point": run.key, "weights": list(run.point.weights), "label": run.point.label, "reference": reference}
        records += [{**where, "index": i, "verdict": j.verdict, "orders": j.orders()} for i, j in enumerate(js)]
    ref.llm = ["tie"] * n  # by definition (the module's docstring)
    return records


def share_judgements(path: Path, records: list[dict[str, Any]]) -> None:
    """Append to the shared cache `path` (a `cache_dir`'s judgements.jsonl) the records with a reply it lacks.

    One write in append mode, so that runs sharing the cache do not interleave their lines; a torn line is skipped
    by `read_cache`, and the reply it held is asked again (a cost, never a wrong verdict)."""
    known = read_cache(path)

    def fresh(order: dict[str, Any]) -> bool:  # a reply the cache lacks and would keep (as `read_cache` reads it)
        return order["key"] not in known and isinstance(order.get("reply"), str) and not order.get("error")

    new = [r for r in records if any(fresh(o) for o in r["orders"])]
    if new:
        path.parent.mkdir(parents=True, exist_ok=True)
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in new)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, text.encode("utf-8"))
        finally:
            os.close(fd)
