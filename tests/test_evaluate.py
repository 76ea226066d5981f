"""Evaluation statistics and math: the paper's Tables 2–5 from their counts, ties, the bootstrap, per-response KL."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from salsa_lightning.evaluation.kl import sequence_kl
from salsa_lightning.evaluation.stats import (
    adjusted_win_rate,
    bootstrap_interval,
    count_verdicts,
    verdict_from_scores,
    verdict_points,
    win_rate,
    win_rate_summary,
)

# (table, dataset, comparison, wins, losses, ties, "Win Rate", "Adj. Win Rate") as printed in the paper (Appendix D,
# E). Each comparison appears from both sides; n = wins + losses + ties. The paper rounds half-way cases both up
# (50.625 -> 50.63) and down (14.375 -> 14.37) and sometimes truncates (3.846 -> 3.84), so a printed value is
# matched to within one unit of its last digit.
PAPER_ROWS = [
    ("2", "MT-Bench", "SALSA>PPO", 29, 21, 110, "18.12", "52.50"),
    ("2", "MT-Bench", "PPO>SALSA", 21, 29, 110, "13.12", "47.50"),
    ("2", "MT-Bench", "SALSA>SFT", 36, 28, 96, "22.50", "52.50"),
    ("2", "MT-Bench", "SFT>SALSA", 28, 36, 96, "17.50", "47.50"),
    ("2", "MT-Bench", "PPO>SFT", 23, 21, 116, "14.37", "50.63"),
    ("2", "MT-Bench", "SFT>PPO", 21, 23, 116, "13.12", "49.37"),
    ("2", "Arena-Hard", "SALSA>PPO", 102, 62, 335, "20.44", "54.01"),
    ("2", "Arena-Hard", "PPO>SALSA", 62, 102, 335, "12.42", "45.99"),
    ("2", "Arena-Hard", "SALSA>SFT", 91, 44, 365, "18.20", "54.70"),
    ("2", "Arena-Hard", "SFT>SALSA", 44, 91, 365, "8.80", "45.30"),
    ("2", "Arena-Hard", "PPO>SFT", 58, 52, 387, "11.67", "50.60"),
    ("2", "Arena-Hard", "SFT>PPO", 52, 58, 387, "10.46", "49.40"),
    ("2", "UltraFeedback", "SALSA>PPO", 477, 447, 1075, "23.86", "50.75"),
    ("2", "UltraFeedback", "PPO>SALSA", 447, 477, 1075, "22.36", "49.25"),
    ("2", "UltraFeedback", "SALSA>SFT", 504, 415, 1080, "25.21", "52.23"),
    ("2", "UltraFeedback", "SFT>SALSA", 415, 504, 1080, "20.76", "47.77"),
    ("2", "UltraFeedback", "PPO>SFT", 443, 417, 1136, "22.19", "50.65"),
    ("2", "UltraFeedback", "SFT>PPO", 417, 443, 1136, "20.89", "49.35"),
    ("3", "MT-Bench", "SALSA>PPO", 30, 24, 105, "18.87", "51.89"),
    ("3", "MT-Bench", "PPO>SALSA", 24, 30, 105, "15.09", "48.11"),
    ("3", "MT-Bench", "SALSA>SFT", 42, 23, 95, "26.25", "55.94"),
    ("3", "MT-Bench", "SFT>SALSA", 23, 42, 95, "14.37", "44.06"),
    ("3", "MT-Bench", "PPO>SFT", 28, 23, 109, "17.50", "51.56"),
    ("3", "MT-Bench", "SFT>PPO", 23, 28, 109, "14.37", "48.44"),
    ("3", "Arena-Hard", "SALSA>PPO", 109, 65, 326, "21.80", "54.40"),
    ("3", "Arena-Hard", "PPO>SALSA", 65, 109, 326, "13.00", "45.60"),
    ("3", "Arena-Hard", "SALSA>SFT", 126, 69, 305, "25.20", "55.70"),
    ("3", "Arena-Hard", "SFT>SALSA", 69, 126, 305, "13.80", "44.30"),
    ("3", "Arena-Hard", "PPO>SFT", 71, 67, 362, "14.20", "50.40"),
    ("3", "Arena-Hard", "SFT>PPO", 67, 71, 362, "13.40", "49.60"),
    ("3", "UltraFeedback", "SALSA>PPO", 497, 401, 1102, "24.85", "52.40"),
    ("3", "UltraFeedback", "PPO>SALSA", 401, 497, 1102, "20.05", "47.60"),
    ("3", "UltraFeedback", "SALSA>SFT", 465, 388, 1146, "23.26", "51.93"),
    ("3", "UltraFeedback", "SFT>SALSA", 388, 465, 1146, "19.41", "48.07"),
    ("4", "MT-Bench", "SALSA>PPO", 37, 14, 109, "23.13", "57.19"),
    ("4", "MT-Bench", "PPO>SALSA", 14, 37, 109, "8.75", "42.81"),
    ("4", "MT-Bench", "SALSA>SFT", 40, 18, 102, "25.0", "56.88"),
    ("4", "MT-Bench", "SFT>SALSA", 18, 40, 102, "11.25", "43.12"),
    ("4", "MT-Bench", "PPO>SFT", 14, 8, 138, "8.75", "51.88"),
    ("4", "MT-Bench", "SFT>PPO", 8, 14, 138, "5.0", "48.12"),
    ("4", "Arena-Hard", "SALSA>PPO", 154, 117, 229, "30.8", "53.7"),
    ("4", "Arena-Hard", "PPO>SALSA", 117, 154, 229, "23.4", "46.3"),
    ("4", "Arena-Hard", "SALSA>SFT", 154, 116, 230, "30.8", "53.8"),
    ("4", "Arena-Hard", "SFT>SALSA", 116, 154, 230, "23.2", "46.2"),
    ("4", "Arena-Hard", "PPO>SFT", 24, 19, 451, "4.86", "50.51"),
    ("4", "Arena-Hard", "SFT>PPO", 19, 24, 451, "3.84", "49.49"),
    ("4", "UltraFeedback", "SALSA>PPO", 174, 147, 1660, "8.78", "50.68"),
    ("4", "UltraFeedback", "PPO>SALSA", 147, 174, 1660, "7.42", "49.32"),
    ("4", "UltraFeedback", "SALSA>SFT", 300, 129, 1548, "15.17", "54.32"),
    ("4", "UltraFeedback", "SFT>SALSA", 129, 300, 1548, "6.53", "45.68"),
    ("4", "UltraFeedback", "PPO>SFT", 276, 129, 1580, "13.90", "53.70"),
    ("4", "UltraFeedback", "SFT>PPO", 129, 276, 1580, "6.50", "46.30"),
    ("5", "MT-Bench", "MKL>PPO", 69, 85, 340, "13.97", "48.38"),
    ("5", "MT-Bench", "PPO>MKL", 85, 69, 340, "17.21", "51.62"),
    ("5", "Arena-Hard", "MKL>PPO", 20, 29, 111, "12.50", "47.19"),
    ("5", "Arena-Hard", "PPO>MKL", 29, 20, 111, "18.13", "52.81"),
]
# Table 3's UltraFeedback PPO-vs-SFT rows print rates that do not follow from their own counts (455/450/1095 gives
# 22.75 and 50.125, not 22.75 and 50.65; the SFT row repeats Table 2's 20.89 / 49.35): a typo in the paper.
PAPER_TYPO_ROWS = [
    ("3", "UltraFeedback", "PPO>SFT", 455, 450, 1095, "22.75", "50.65"),
    ("3", "UltraFeedback", "SFT>PPO", 450, 455, 1095, "20.89", "49.35"),
]


def _matches(printed: str, value: float) -> bool:
    decimals = len(printed.split(".")[1]) if "." in printed else 0
    return abs(float(printed) - value) <= 10.0**-decimals + 1e-9


@pytest.mark.parametrize("row", PAPER_ROWS, ids=lambda r: f"table{r[0]}-{r[1]}-{r[2]}")
def test_paper_tables_from_their_counts(row):
    _, _, _, wins, losses, ties, wr, adj = row
    assert _matches(wr, win_rate(wins, losses, ties))
    assert _matches(adj, adjusted_win_rate(wins, losses, ties))


def test_paper_table2_first_row_exactly():
    assert win_rate(29, 21, 110) == pytest.approx(18.125)
    assert adjusted_win_rate(29, 21, 110) == pytest.approx(52.5)
    assert f"{adjusted_win_rate(29, 21, 110):.2f}" == "52.50"
    assert (29 + 110 / 2) / 160 * 100 == adjusted_win_rate(29, 21, 110)


def test_paper_typo_rows_do_not_follow_from_their_counts():
    for _, _, _, wins, losses, ties, _, adj in PAPER_TYPO_ROWS:
        assert not _matches(adj, adjusted_win_rate(wins, losses, ties))


def test_both_sides_of_a_comparison_add_up_to_100():
    for wins, losses, ties in [(29, 21, 110), (0, 0, 5), (7, 0, 0), (3, 9, 1)]:
        assert adjusted_win_rate(wins, losses, ties) + adjusted_win_rate(losses, wins, ties) == pytest.approx(100.0)


def test_a_judge_that_always_says_tie_gives_50():
    verdicts = ["tie"] * 37
    assert adjusted_win_rate(0, 0, 37) == 50.0
    summary = win_rate_summary(verdicts, samples=200, seed=0)
    assert summary["adjusted_win_rate"] == 50.0 and summary["win_rate"] == 0.0
    assert summary["adjusted_win_rate_ci"] == [50.0, 50.0]


def test_all_wins_and_all_losses():
    assert win_rate(5, 0, 0) == adjusted_win_rate(5, 0, 0) == 100.0
    assert win_rate(0, 5, 0) == adjusted_win_rate(0, 5, 0) == 0.0


def test_rates_are_means_of_verdict_points():
    rng = np.random.default_rng(0)
    verdicts = list(rng.choice(["win", "loss", "tie"], size=91))
    c = count_verdicts(verdicts)
    assert (c.wins, c.losses, c.ties) == (verdicts.count("win"), verdicts.count("loss"), verdicts.count("tie"))
    assert 100 * verdict_points(verdicts, 0.0).mean() == pytest.approx(win_rate(c.wins, c.losses, c.ties))
    assert 100 * verdict_points(verdicts, 0.5).mean() == pytest.approx(adjusted_win_rate(c.wins, c.losses, c.ties))


def test_bad_counts_and_verdicts_are_refused():
    with pytest.raises(ValueError):
        win_rate(0, 0, 0)
    with pytest.raises(ValueError):
        adjusted_win_rate(-1, 2, 3)
    with pytest.raises(ValueError):
        count_verdicts(["win", "draw"])
    with pytest.raises(ValueError):
        verdict_points(["A"], 0.5)


def test_bootstrap_contains_the_estimate_and_is_deterministic():
    rng = np.random.default_rng(1)
    verdicts = list(rng.choice(["win", "loss", "tie"], p=[0.3, 0.2, 0.5], size=160))
    values = 100 * verdict_points(verdicts, 0.5)
    lo, hi = bootstrap_interval(values, samples=1000, seed=7)
    assert lo < values.mean() < hi
    assert (lo, hi) == bootstrap_interval(values, samples=1000, seed=7)
    assert (lo, hi) != bootstrap_interval(values, samples=1000, seed=8)
    # a wider confidence gives a wider interval from the same resamples
    lo99, hi99 = bootstrap_interval(values, samples=1000, seed=7, confidence=0.99)
    assert lo99 <= lo and hi <= hi99


def test_bootstrap_matches_a_naive_loop():
    values = np.array([0.0, 1.0, 0.5, 0.5, 1.0, 0.0, 1.0])
    samples, seed = 300, 3
    rng = np.random.Generator(np.random.PCG64(seed))
    idx = rng.integers(0, len(values), size=(samples, len(values)))
    means = sorted(sum(values[j] for j in row) / len(row) for row in idx)
    lo, hi = bootstrap_interval(values, samples=samples, seed=seed)
    assert lo == pytest.approx(np.quantile(means, 0.025)) and hi == pytest.approx(np.quantile(means, 0.975))


def test_bootstrap_width_shrinks_with_more_prompts():
    rng = np.random.default_rng(2)
    small = rng.choice([0.0, 0.5, 1.0], size=50)
    large = rng.choice([0.0, 0.5, 1.0], size=5000)
    w_small = np.diff(bootstrap_interval(small, seed=0))[0]
    w_large = np.diff(bootstrap_interval(large, seed=0))[0]
    assert w_large < w_small / 5


def test_verdict_from_scores_tie_margin():
    assert verdict_from_scores(1.0, 0.5) == "win"
    assert verdict_from_scores(0.5, 1.0) == "loss"
    assert verdict_from_scores(0.7, 0.7) == "tie"
    assert verdict_from_scores(1.0, 0.5, tie_margin=0.5) == "tie"  # within the margin, boundary included
    assert verdict_from_scores(1.0, 0.4, tie_margin=0.5) == "win"
    with pytest.raises(ValueError):
        verdict_from_scores(1.0, 0.0, tie_margin=-1)


def test_sequence_kl_hand_computed_and_naive():
    logp = [torch.tensor([-1.0, -2.0]), torch.tensor([-0.5]), torch.tensor([])]
    ref = [torch.tensor([-1.5, -1.0]), torch.tensor([-0.25]), torch.tensor([])]
    kl = sequence_kl(logp, ref)
    # (-1 + 1.5) + (-2 + 1) = -0.5;  -0.5 + 0.25 = -0.25;  an empty response has KL 0
    torch.testing.assert_close(kl, torch.tensor([-0.5, -0.25, 0.0]))
    naive = [sum(float(a) - float(b) for a, b in zip(x, y, strict=True)) for x, y in zip(logp, ref, strict=True)]
    assert kl.tolist() == pytest.approx(naive)
    assert sequence_kl(logp, logp).tolist() == [0.0, 0.0, 0.0]


def test_sequence_kl_rows_of_different_lengths():
    # rows are padded to a common length internally; the padding must add nothing to any row
    a = [torch.tensor([-1.0]), torch.tensor([-1.0, -3.0, -0.1])]
    b = [torch.tensor([-2.0]), torch.tensor([-1.0, -1.0, -0.1])]
    assert sequence_kl(a, b).tolist() == pytest.approx([1.0, -2.0])
    assert all(math.isfinite(x) for x in sequence_kl(a, b).tolist())
    with pytest.raises(ValueError):
        sequence_kl([torch.zeros(2)], [torch.zeros(3)])
