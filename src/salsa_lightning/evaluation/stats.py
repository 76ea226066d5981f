"""Pairwise win statistics as pure functions: counts in, percentages out, as in the paper's Tables 2–5.

A judge compares system A's and system B's responses to the same n prompts and says, from A's point of
view, win, loss or tie. The paper reports (Appendix D)

    win rate          = 100 · wins / n
    adjusted win rate = 100 · (wins + ties / 2) / n

so a tie counts half a win, and two indistinguishable systems score 50. Both are means over prompts of
a per-prompt point (win 1, tie 0 or ½, loss 0); `bootstrap_interval` resamples prompts to put a
percentile interval around such a mean.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

Verdict = Literal["win", "loss", "tie"]
VERDICTS: tuple[Verdict, ...] = ("win", "loss", "tie")


@dataclass(frozen=True)
class VerdictCounts:
    wins: int
    losses: int
    ties: int

    @property
    def n(self) -> int:
        return self.wins + self.losses + self.ties


def count_verdicts(verdicts: Iterable[str]) -> VerdictCounts:
    """Wins, losses and ties in a sequence of 'win'/'loss'/'tie' verdicts; anything else is a ValueError."""
    counts = dict.fromkeys(VERDICTS, 0)
    for v in verdicts:
        if v not in counts:
            raise ValueError(f"unknown verdict {v!r}; expected one of {VERDICTS}")
        counts[v] += 1
    return VerdictCounts(counts["win"], counts["loss"], counts["tie"])


def _total(wins: int, losses: int, ties: int) -> int:
    if min(wins, losses, ties) < 0:
        raise ValueError(f"counts must be non-negative, got {wins}/{losses}/{ties}")
    n = wins + losses + ties
    if n == 0:
        raise ValueError("no comparisons: a win rate needs at least one judged prompt")
    return n


def win_rate(wins: int, losses: int, ties: int) -> float:
    """100 · wins / n, n = wins + losses + ties (the paper's "Win Rate")."""
    return 100.0 * wins / _total(wins, losses, ties)


def adjusted_win_rate(wins: int, losses: int, ties: int) -> float:
    """100 · (wins + ties / 2) / n (the paper's "Adj. Win Rate"): a tie is half a win."""
    return 100.0 * (wins + 0.5 * ties) / _total(wins, losses, ties)


def verdict_points(verdicts: Sequence[str], tie_value: float) -> np.ndarray:
    """Per-prompt points (n,): win 1, loss 0, tie `tie_value` (0 for the win rate, ½ for the adjusted one).

    Their mean times 100 is `win_rate` (tie_value 0) or `adjusted_win_rate` (tie_value ½).
    """
    points = {"win": 1.0, "loss": 0.0, "tie": tie_value}
    try:
        return np.array([points[v] for v in verdicts], dtype=np.float64)
    except KeyError as err:
        raise ValueError(f"unknown verdict {err.args[0]!r}; expected one of {VERDICTS}") from None


def verdict_from_scores(score_a: float, score_b: float, tie_margin: float = 0.0) -> Verdict:
    """A's verdict when a judge gives scalar scores: a tie unless the scores differ by more than `tie_margin`."""
    if tie_margin < 0:
        raise ValueError(f"tie_margin must be >= 0, got {tie_margin}")
    diff = score_a - score_b
    if diff > tie_margin:
        return "win"
    if diff < -tie_margin:
        return "loss"
    return "tie"


def bootstrap_interval(
    values: Sequence[float] | np.ndarray, samples: int = 1000, seed: int = 0, confidence: float = 0.95
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of `values`, resampling them with replacement.

    `values`: (n,) one number per prompt (e.g. `100 * verdict_points(...)`). Draws `samples` resamples of
    size n from a generator seeded with `seed` (the same inputs and seed give the same interval on any
    machine) and returns the (1 - confidence)/2 and (1 + confidence)/2 quantiles of their means. The
    point estimate, the plain mean, lies inside unless the distribution of means is very lopsided.
    """
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1 or x.size == 0:
        raise ValueError(f"values must be a non-empty 1-D sequence, got shape {x.shape}")
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    rng = np.random.Generator(np.random.PCG64(seed))
    idx = rng.integers(0, x.size, size=(samples, x.size))  # (S, n) prompt indices per resample
    means = x[idx].mean(axis=1)  # (S,)
    alpha = (1.0 - confidence) / 2
    lo, hi = np.quantile(means, [alpha, 1.0 - alpha])
    return float(lo), float(hi)


def win_rate_summary(
    verdicts: Sequence[str], samples: int = 1000, seed: int = 0, confidence: float = 0.95
) -> dict[str, float | int | list[float] | None]:
    """Counts, both rates and their bootstrap intervals for one pair's verdicts on one prompt set.

    Both intervals come from the same resampled prompts (one seed), so they are consistent with each other.
    No verdicts (an llm judge that answered nothing usable): n = 0, and the rates and intervals are None.
    """
    c = count_verdicts(verdicts)
    if c.n == 0:
        none = {"win_rate": None, "win_rate_ci": None, "adjusted_win_rate": None, "adjusted_win_rate_ci": None}
        return {"wins": 0, "losses": 0, "ties": 0, "n": 0, **none}
    wr_ci = bootstrap_interval(100.0 * verdict_points(verdicts, 0.0), samples, seed, confidence)
    adj_ci = bootstrap_interval(100.0 * verdict_points(verdicts, 0.5), samples, seed, confidence)
    return {
        "wins": c.wins,
        "losses": c.losses,
        "ties": c.ties,
        "n": c.n,
        "win_rate": win_rate(c.wins, c.losses, c.ties),
        "win_rate_ci": list(wr_ci),
        "adjusted_win_rate": adjusted_win_rate(c.wins, c.losses, c.ties),
        "adjusted_win_rate_ci": list(adj_ci),
    }
