"""What the llm judge's replies mean: the verdict read out of one reply, the two orders combined into system a's
verdict (a tie when they disagree), and the `unparseable` / `failed` comparisons that are counted, never tied."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

Choice = Literal["A", "B", "C"]  # C: a tie

_DOUBLE = re.compile(r"\[\[\s*([ABC])\s*\]\]")
_SINGLE = re.compile(r"(?<!\[)\[\s*([ABC])\s*\](?!\])")
_FINAL_LINE = re.compile(r"^[*_#>\s]*(?:final\s+)?verdict[*_\s]*[:\-–][*_\s]*\[{0,2}(A|B|C|tie)\]{0,2}[*_.!\s]*$", re.I)


def parse_verdict(reply: str | None) -> Choice | None:
    """The judge's choice in `reply`, or None when it cannot be read with confidence.

    Accepted, in this order: bracketed letters `[[A]]` / `[[B]]` / `[[C]]`, then single-bracketed `[A]` ..., each
    only if every such mark in the reply names the same letter; then a last line `Final verdict: A` (or
    `Verdict: B`, `Final verdict: tie`, with Markdown emphasis). Free prose ("A is better") is not guessed at.
    """
    if not reply:
        return None
    for pattern in (_DOUBLE, _SINGLE):
        found = set(pattern.findall(reply))
        if found:
            return found.pop() if len(found) == 1 else None  # two different marks: ambiguous
    lines = [line.strip() for line in reply.splitlines() if line.strip()]
    m = _FINAL_LINE.match(lines[-1]) if lines else None
    if m is None:
        return None
    choice = m.group(1).upper()
    return "C" if choice == "TIE" else choice  # type: ignore[return-value]


def combine_orders(first: Choice | None, second: Choice | None) -> str | None:
    """System a's verdict from the choice with a's response shown as A (`first`) and with b's shown as A (`second`).

    Agreement gives the verdict, disagreement a tie (position bias cancels); None if either could not be read.
    """
    if first is None or second is None:
        return None
    v1 = {"A": "win", "B": "loss", "C": "tie"}[first]
    v2 = {"A": "loss", "B": "win", "C": "tie"}[second]  # the labels are swapped in the second order
    return v1 if v1 == v2 else "tie"


@dataclass
class Reply:
    """One request's outcome: the reply text (None when the request failed) and its token counts."""

    key: str
    text: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None  # the last error; a reply with an error is not cached
    cached: bool = False
    attempts: int = 0  # requests sent for it in this run

    @property
    def choice(self) -> Choice | None:
        return parse_verdict(self.text)

    def record(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "reply": self.text,
            "choice": self.choice,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            **({"error": self.error} if self.error else {}),
        }


@dataclass
class PairJudgement:
    """One comparison: system a's verdict ('win'/'loss'/'tie', or 'unparseable'/'failed') and the two replies."""

    verdict: str
    replies: tuple[Reply, Reply]  # (a's response shown as A, b's response shown as A)

    def orders(self) -> list[dict[str, Any]]:
        return [{"a_shown_as": "A", **self.replies[0].record()}, {"a_shown_as": "B", **self.replies[1].record()}]


def combine_replies(first: Reply, second: Reply) -> PairJudgement:
    """One comparison's judgement from its two orders' replies: `failed` if either request failed, `unparseable` if
    either reply has no readable verdict, else `combine_orders` of the two."""
    if first.text is None or second.text is None:
        return PairJudgement("failed", (first, second))
    verdict = combine_orders(first.choice, second.choice)
    return PairJudgement(verdict or "unparseable", (first, second))


def split_verdicts(judgements: Iterable[PairJudgement]) -> tuple[list[str], int, int]:
    """The win/loss/tie verdicts (for `stats.win_rate_summary`) and the unparseable and failed counts left out."""
    verdicts, unparseable, failed = [], 0, 0
    for j in judgements:
        if j.verdict == "unparseable":
            unparseable += 1
        elif j.verdict == "failed":
            failed += 1
        else:
            verdicts.append(j.verdict)
    return verdicts, unparseable, failed
