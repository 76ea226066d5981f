"""benchmarks/learning.py's soup-vs-init comparison: paired by seed and prompt, only over seeds both anchors ran."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("learning", ROOT / "benchmarks" / "learning.py")
learning = importlib.util.module_from_spec(spec)
spec.loader.exec_module(learning)


def arm(estimator: str, anchor: str, seed: int, final: list[float], updates: int = 4) -> dict:
    start = [0.0] * len(final)
    return {"estimator": estimator, "anchor": anchor, "seed": seed,
            "curve": [{"update": 0, "id": start, "ood": start}, {"update": updates, "id": final, "ood": start}]}  # fmt: skip


def test_soup_minus_init_by_hand():
    results = [
        arm("grpo", "init", 1, [0.0, 1.0, 0.0, 0.0]),
        arm("grpo", "soup", 1, [1.0, 1.0, 0.0, 0.0]),  # seed 1: +1 on prompt 0 -> +0.25
        arm("grpo", "init", 2, [0.0, 0.0, 0.5, 0.0]),
        arm("grpo", "soup", 2, [0.0, 0.0, 0.0, 0.0]),  # seed 2: -0.5 on prompt 2 -> -0.125
        arm("grpo", "soup", 3, [1.0, 1.0, 1.0, 1.0]),  # no init arm for seed 3: left out
        arm("gae", "init", 1, [1.0, 1.0, 1.0, 1.0]),  # another estimator: not mixed in
    ]
    e = learning.anchor_effect(results, "grpo", "id")
    assert e["seeds"] == [1, 2]
    assert e["per_seed"] == pytest.approx([0.25, -0.125])
    assert e["diff"] == pytest.approx(0.0625)  # per prompt over the seeds: +0.5, 0, -0.25, 0
    assert e["ci"][0] <= e["diff"] <= e["ci"][1] and e["ci"][0] < 0 < e["ci"][1]
    assert learning.anchor_effect(results, "grpo", "ood")["diff"] == 0.0
    assert learning.anchor_effect(results, "gae", "id") is None  # only one anchor ran


def test_runs_of_different_lengths_are_not_paired():
    results = [arm("grpo", "init", 1, [0.0, 1.0]), arm("grpo", "soup", 1, [1.0, 1.0], updates=8)]
    assert learning.anchor_effect(results, "grpo", "id") is None
