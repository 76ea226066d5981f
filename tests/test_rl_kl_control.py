"""Fixed and adaptive KL controllers (Ziegler et al. 2019), checkpoint round trip, bad input."""

from __future__ import annotations

import math

import pytest

from salsa_lightning.errors import SalsaError
from salsa_lightning.rl.kl_control import AdaptiveKLController, FixedKLController, make_kl_controller


def test_fixed_controller_never_moves():
    ctl = FixedKLController(0.2)
    for kl in (0.0, 5.0, 1e6):
        assert ctl.update(kl, n_steps=64) == 0.2
    assert ctl.value == 0.2


@pytest.mark.parametrize(
    "kl,expected",
    [
        (9.0, 0.1 * (1 + 0.2 * 0.1)),  # 9/6 - 1 = 0.5 -> clipped 0.2; n/horizon = 1000/10000 -> 0.102
        (3.0, 0.1 * (1 - 0.2 * 0.1)),  # 3/6 - 1 = -0.5 -> clipped -0.2 -> 0.098
        (6.6, 0.1 * (1 + 0.1 * 0.1)),  # 6.6/6 - 1 = 0.1 (inside the clip) -> 0.101
        (6.0, 0.1),  # on target: unchanged
    ],
)
def test_adaptive_hand_computed(kl, expected):
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    assert ctl.update(kl, n_steps=1000) == pytest.approx(expected)
    assert ctl.value == pytest.approx(expected)


def test_adaptive_matches_naive_loop_and_respects_the_bound():
    kls = [0.5, 12.0, 6.1, 5.0, 100.0, 0.0, 7.0, 6.0]
    n, horizon, target = 256, 2000, 6.0
    ctl = AdaptiveKLController(0.2, target, horizon)
    beta = 0.2
    for kl in kls:
        e = min(max(kl / target - 1, -0.2), 0.2)
        beta *= 1 + e * n / horizon
        before = ctl.value
        after = ctl.update(kl, n)
        assert after == pytest.approx(beta)
        # direction: up when above target, down when below
        assert (after > before) == (kl > target) and (after < before) == (kl < target)
        # bound: at most ±20%·n/horizon per update
        assert 1 - 0.2 * n / horizon - 1e-12 <= after / before <= 1 + 0.2 * n / horizon + 1e-12


def test_non_finite_kl_leaves_beta_unchanged():
    ctl = AdaptiveKLController(0.1, 6.0, 100)
    for kl in (math.nan, math.inf):
        assert ctl.update(kl, 10) == 0.1


def test_state_round_trip_resumes_identically():
    a = AdaptiveKLController(0.1, 6.0, 1000)
    for kl in (9.0, 8.0):
        a.update(kl, 100)
    b = AdaptiveKLController(0.1, 6.0, 1000)
    b.load_state_dict(a.state_dict())
    assert b.value == a.value
    assert a.update(1.0, 100) == b.update(1.0, 100)
    f = FixedKLController(0.3)
    g = FixedKLController(0.0)
    g.load_state_dict(f.state_dict())
    assert g.value == 0.3


def test_loading_the_other_kind_is_a_salsa_error():
    with pytest.raises(SalsaError, match="resume"):
        FixedKLController(0.1).load_state_dict(AdaptiveKLController(0.1, 6.0, 10).state_dict())


@pytest.mark.parametrize(
    "build,match",
    [
        (lambda: FixedKLController(-0.1), "kl_coef"),
        (lambda: AdaptiveKLController(-0.1, 6.0, 10), "kl_coef"),
        (lambda: AdaptiveKLController(0.1, 0.0, 10), "kl_target"),
        (lambda: AdaptiveKLController(0.1, 6.0, 0), "kl_horizon"),
    ],
)
def test_bad_config_is_a_salsa_error(build, match):
    with pytest.raises(SalsaError, match=match):
        build()


def test_make_kl_controller():
    assert isinstance(make_kl_controller(0.2), FixedKLController)
    ctl = make_kl_controller(0.2, target=6.0, horizon=500)
    assert isinstance(ctl, AdaptiveKLController) and ctl.horizon == 500.0
