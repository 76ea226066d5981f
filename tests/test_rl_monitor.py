"""KL-hack detector (SALSA paper A.4): response length collapsing below a fraction of its start."""

from __future__ import annotations

import math

import pytest

from salsa_lightning.errors import SalsaError
from salsa_lightning.rl.monitor import KLHackMonitor, kl_hack_detected


def test_hand_computed_threshold():
    # reference 100 tokens, fraction 0.25 -> threshold 25
    assert kl_hack_detected(100.0, 20.0, 0.25)
    assert not kl_hack_detected(100.0, 25.0, 0.25)  # at the threshold: not below it
    assert not kl_hack_detected(100.0, 30.0, 0.25)


def test_monitor_uses_the_mean_of_the_first_updates_as_reference():
    m = KLHackMonitor(min_fraction=0.5, reference_updates=2)
    assert not m.update(100.0) and m.reference_length is None
    assert not m.update(60.0)
    assert m.reference_length == 80.0  # (100 + 60) / 2 -> threshold 40
    assert not m.update(41.0)
    assert m.update(39.0)


def test_patience_needs_consecutive_short_updates():
    m = KLHackMonitor(min_fraction=0.5, patience=2)
    m.update(100.0)
    assert not m.update(10.0)  # 1 below
    assert not m.update(60.0)  # recovered: counter resets
    assert not m.update(10.0)
    assert m.update(10.0)  # 2 in a row


def test_non_finite_lengths_are_ignored():
    m = KLHackMonitor(min_fraction=0.5)
    assert not m.update(math.nan)
    assert m.reference_length is None
    m.update(100.0)
    assert not m.update(math.inf)


def test_state_round_trip():
    a = KLHackMonitor(min_fraction=0.5, reference_updates=2, patience=2)
    for length in (100.0, 80.0, 10.0):
        a.update(length)
    b = KLHackMonitor(min_fraction=0.5, reference_updates=2, patience=2)
    b.load_state_dict(a.state_dict())
    assert b.reference_length == 90.0
    assert b.update(10.0) and a.update(10.0)  # the second short update in a row fires in both


@pytest.mark.parametrize(
    "kwargs", [{"min_fraction": 0.0}, {"min_fraction": 1.5}, {"patience": 0}, {"reference_updates": 0}]
)
def test_bad_config_is_a_salsa_error(kwargs):
    with pytest.raises(SalsaError):
        KLHackMonitor(**kwargs)
