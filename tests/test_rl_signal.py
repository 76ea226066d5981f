"""benchmarks/rl_signal.py's per-family table: what a group estimator can learn from, before any RL."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("rl_signal", ROOT / "benchmarks" / "rl_signal.py")
rl_signal = importlib.util.module_from_spec(spec)
spec.loader.exec_module(rl_signal)


def test_family_table_by_hand():
    families = ["a", "a", "b"]
    greedy = [1.0, 0.0, 0.25]
    sampled = [[1.0, 0.0], [0.0, 0.0], [0.25, 0.25]]  # a: one prompt with signal; b: partial credit, no signal
    rows = {r["family"]: r for r in rl_signal.family_table(families, greedy, sampled)}
    assert rows["a"] == pytest.approx(
        {"family": "a", "prompts": 2, "greedy": 0.5, "sampled": 0.25, "pass": 0.5, "full": 0.5, "signal": 0.5}
    )
    assert rows["b"]["pass"] == 1.0 and rows["b"]["full"] == 0.0 and rows["b"]["signal"] == 0.0
    assert rows["all"]["prompts"] == 3 and rows["all"]["signal"] == pytest.approx(1 / 3)
    assert rows["all"]["sampled"] == pytest.approx((0.5 + 0.0 + 0.25) / 3)
