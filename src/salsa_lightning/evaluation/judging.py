"""Each pair of systems judged on each split by each judge: the gold judge and the reward model verdict by verdict,
the llm judge on every pair at once through one pool of requests; win-rate summaries and the per-prompt verdicts."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console

from salsa_lightning.data import judge as gold
from salsa_lightning.evaluation.config import EvalConfig
from salsa_lightning.evaluation.llm_judge import (
    Comparison,
    LLMJudge,
    LLMJudgeSpec,
    PairJudgement,
    comparison,
    read_cache,
    split_verdicts,
)
from salsa_lightning.evaluation.responses import Responses
from salsa_lightning.evaluation.runtime import progress_bar
from salsa_lightning.evaluation.splits import SplitPrompts
from salsa_lightning.evaluation.stats import verdict_from_scores, win_rate_summary

JUDGEMENTS = "judgements.jsonl"  # one judgement per line; the llm judge's lines hold both orders' replies: its cache


def connect_llm_judge(spec: LLMJudgeSpec, caches: Sequence[Path] = ()) -> LLMJudge:
    """The llm judge of `spec`, its pre-flight passed (key set, endpoint reachable, model served) — before any model
    is loaded; the replies in the judgements.jsonl files `caches` (earlier runs', missing ones skipped) are its cache."""
    cache: dict[str, dict[str, Any]] = {}
    for f in caches:
        cache.update(read_cache(f))  # each reply is keyed by everything that decides it
    judge = LLMJudge(spec, cache)
    judge.connect()
    return judge


def judge_with_progress(judge: LLMJudge, comparisons: Sequence[Comparison], console: Console) -> list[PairJudgement]:
    """`judge.judge(comparisons)` in one batch (so the thread pool stays full), with a progress bar on `console`."""
    with progress_bar(console) as progress:
        task = progress.add_task(f"llm judge ({judge.spec.model})", total=None)
        return judge.judge(comparisons, on_reply=lambda done, total: progress.update(task, completed=done, total=total))


def unusable_warning(judged: Sequence[PairJudgement], what: str) -> str | None:
    """The sentence to print when none of `judged` has a usable verdict (a wrong judge model, template or
    endpoint), else None. A warning, not an error: the run still writes its table (n = 0, the unparseable and
    failed counts) and every reply to judgements.jsonl, the cache a re-run with a fixed parser or template reads,
    so replies that were paid for are never thrown away with the responses they judged."""
    if not judged or split_verdicts(judged)[0]:
        return None
    first = judged[0].replies
    example = first[0].error or first[0].text or first[1].error or ""
    return (
        f"The llm judge gave no usable verdict for {what} (every prompt unparseable or failed; e.g. "
        f"{example[:200]!r}); check llm_judge.model, the template and the endpoint."
    )


def warn_if_unusable(judged: Sequence[PairJudgement], what: str, console: Console) -> str | None:
    """`unusable_warning`, printed on `console` (and on stderr when `console` is quiet, so no caller loses it)."""
    message = unusable_warning(judged, what)
    if message:
        (console if not console.quiet else Console(stderr=True, soft_wrap=True)).print(
            f"[yellow]warning:[/] {message}", markup=True
        )
    return message


def _judge_with_llm(
    judge: LLMJudge,
    pairs: list[tuple[str, str]],
    splits: dict[str, SplitPrompts],
    responses: dict[str, dict[str, Responses]],
    console: Console,
) -> dict[tuple[str, str, str], list[PairJudgement]]:
    """Every pair on every split in one batch, so the thread pool stays full across pairs."""
    spans, comparisons = [], []
    for a, b in pairs:
        for split in splits:
            ra, rb = responses[a][split], responses[b][split]
            spans.append(((a, b, split), len(comparisons), len(comparisons) + len(ra.texts)))
            # a later turn: each system's own conversation, so the judge sees what each answer follows
            comparisons += map(comparison, ra.prompts, ra.texts, rb.prompts, rb.texts)
    judged = judge_with_progress(judge, comparisons, console)
    out = {key: judged[lo:hi] for key, lo, hi in spans}
    for (a, b, split), js in out.items():
        warn_if_unusable(js, f"{a} vs {b} on {split}", console)
    return out


def _verdicts(judge: str, cfg: EvalConfig, prompts: SplitPrompts, a: Responses, b: Responses) -> list[str]:
    if judge == "gold":
        return [gold.compare(p, x, y) for p, x, y in zip(prompts.texts, a.texts, b.texts, strict=True)]
    return [verdict_from_scores(x, y, cfg.reward_tie_margin) for x, y in zip(a.reward, b.reward, strict=True)]


def judge_pairs(
    cfg: EvalConfig,
    pairs: list[tuple[str, str]],
    splits: dict[str, SplitPrompts],
    responses: dict[str, dict[str, Responses]],
    llm: LLMJudge | None,
    console: Console,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """One win-rate record per (judge, pair, split), bootstrap intervals included, and one judgement per prompt
    (judgements.jsonl: the llm judge's with both orders' replies, which are its cache). The llm judge's prompts
    without a usable verdict are counted and left out of n (n = 0 and no rates when none has one)."""
    llm_judged = _judge_with_llm(llm, pairs, splits, responses, console) if llm else {}
    pair_records, judgements = [], []
    for judge in cfg.judges:
        for a, b in pairs:
            for split, prompts in splits.items():
                where = {"judge": judge, "split": split, "a": a, "b": b}
                if judge == "llm":
                    js = llm_judged[(a, b, split)]
                    verdicts, unparseable, failed = split_verdicts(js)
                    left_out = {"unparseable": unparseable, "failed": failed}
                    judgements += [
                        {**where, "index": i, "verdict": j.verdict, "orders": j.orders()} for i, j in enumerate(js)
                    ]
                else:
                    verdicts = _verdicts(judge, cfg, prompts, responses[a][split], responses[b][split])
                    left_out = {}
                    judgements += [{**where, "index": i, "verdict": v} for i, v in enumerate(verdicts)]
                summary = win_rate_summary(verdicts, cfg.bootstrap_samples, cfg.seed)
                pair_records.append({**where, **summary, **left_out})
    return pair_records, judgements


def llm_note(report: dict[str, Any]) -> str:
    """The line under the win-rate table about the llm judge: requests, retries, cache, tokens, replies left out."""
    return (
        f"LLM judge {report['model']}: {report['requests']} requests ({report['retries']} retries), "
        f"{report['cached_replies']} cached replies, {report['prompt_tokens']} prompt + "
        f"{report['completion_tokens']} completion tokens; {report['unparseable_replies']} unparseable replies, "
        f"{report['failed_replies']} failed requests (their prompts are left out of n)."
        + (
            f" No usable verdict for {', '.join(report['no_usable_verdict'])}."
            if report.get("no_usable_verdict")
            else ""
        )
    )
