"""KL estimators k1/k2/k3 and the multi-anchor mean (SALSA eq. 5)."""

from __future__ import annotations

import math

import pytest
import torch

from salsa_lightning.errors import SalsaError
from salsa_lightning.rl.kl import get_kl_estimator, kl_k1, kl_k2, kl_k3, kl_penalty, multi_anchor_kl


def test_hand_computed_estimators():
    # π_θ(y) = 0.5, π_anchor(y) = 0.25: log ratio logp - logp_ref = ln 2, r = π_anchor / π_θ = 0.5
    logp, ref = torch.tensor(math.log(0.5)), torch.tensor(math.log(0.25))
    assert kl_k1(logp, ref).item() == pytest.approx(math.log(2))  # 0.6931
    assert kl_k2(logp, ref).item() == pytest.approx(0.5 * math.log(2) ** 2)  # 0.2402
    assert kl_k3(logp, ref).item() == pytest.approx((0.5 - 1) - math.log(0.5))  # -0.5 + 0.6931 = 0.1931


@pytest.mark.parametrize("name", ["k1", "k2", "k3"])
def test_matches_naive_loop(name):
    g = torch.Generator().manual_seed(0)
    logp = torch.randn(3, 5, generator=g, dtype=torch.float64) - 2
    ref = torch.randn(3, 5, generator=g, dtype=torch.float64) - 2
    naive = {
        "k1": lambda a, b: a - b,
        "k2": lambda a, b: 0.5 * (a - b) ** 2,
        "k3": lambda a, b: (math.exp(b - a) - 1) - (b - a),
    }[name]
    out = kl_penalty(logp, ref, name)
    for i in range(3):
        for t in range(5):
            assert out[i, t].item() == pytest.approx(naive(logp[i, t].item(), ref[i, t].item()))


def test_k1_and_k3_are_unbiased_for_the_true_kl():
    """E_{y~π_θ}[k1] = E[k3] = KL(π_θ ‖ π_anchor): weight each token's estimate by its probability."""
    g = torch.Generator().manual_seed(1)
    logp = torch.log_softmax(torch.randn(4, 20, generator=g, dtype=torch.float64), -1)  # 4 positions, V = 20
    ref = torch.log_softmax(torch.randn(4, 20, generator=g, dtype=torch.float64), -1)
    true_kl = (logp.exp() * (logp - ref)).sum(-1)
    for fn in (kl_k1, kl_k3):
        torch.testing.assert_close((logp.exp() * fn(logp, ref)).sum(-1), true_kl)
    assert ((logp.exp() * kl_k2(logp, ref)).sum(-1) > 0).all()  # k2 is biased but still non-negative


def test_k2_k3_non_negative_and_all_zero_at_equality():
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(100, generator=g), torch.randn(100, generator=g)
    assert (kl_k2(a, b) >= 0).all() and (kl_k3(a, b) >= 0).all()
    for fn in (kl_k1, kl_k2, kl_k3):
        assert (fn(a, a) == 0).all()


def test_k3_is_accurate_for_tiny_log_ratios():
    """expm1 keeps float32 precision where exp(d) - 1 would cancel: k3 ≈ d²/2 for small d."""
    d = 1e-4
    out = kl_k3(torch.tensor(0.0), torch.tensor(d))  # log r = d
    assert out.item() == pytest.approx(math.expm1(d) - d, rel=1e-3)  # ≈ 5.0002e-9


def test_gradient_pulls_the_policy_toward_the_anchor():
    """Minimising k1/k2/k3 lowers logp where the policy over-weights the token (logp > logp_ref)."""
    ref = torch.tensor([-2.0, -2.0])
    for fn in (kl_k1, kl_k2, kl_k3):
        logp = torch.tensor([-1.0, -3.0], requires_grad=True)  # above, then below the anchor
        fn(logp, ref).sum().backward()
        assert logp.grad[0] > 0  # gradient descent lowers the over-weighted token
        if fn is not kl_k1:  # k1's gradient is 1 everywhere; only its expectation is a divergence
            assert logp.grad[1] < 0


def test_unknown_estimator_is_a_salsa_error():
    with pytest.raises(SalsaError, match="k1, k2, k3"):
        get_kl_estimator("k4")
    with pytest.raises(SalsaError):
        kl_penalty(torch.zeros(1), torch.zeros(1), "full")


def test_multi_anchor_hand_computed():
    # logp = -1; anchors -2 and -4: k1 = 1 and 3, mean 2 (eq. 5 with β/2·(KL1 + KL2))
    logp = torch.tensor([[-1.0]])
    refs = torch.tensor([[[-2.0]], [[-4.0]]])  # (J=2, B=1, T=1)
    assert multi_anchor_kl(logp, refs, "k1").item() == pytest.approx(2.0)
    # k2: ½·1² = 0.5 and ½·3² = 4.5 -> mean 2.5
    assert multi_anchor_kl(logp, refs, "k2").item() == pytest.approx(2.5)


@pytest.mark.parametrize("name", ["k1", "k2", "k3"])
def test_multi_anchor_matches_naive_loop_and_single_anchor_is_ppo(name):
    g = torch.Generator().manual_seed(3)
    logp = torch.randn(2, 4, generator=g, dtype=torch.float64)
    refs = torch.randn(3, 2, 4, generator=g, dtype=torch.float64)
    naive = sum(kl_penalty(logp, refs[j], name) for j in range(3)) / 3
    torch.testing.assert_close(multi_anchor_kl(logp, refs, name), naive)
    torch.testing.assert_close(multi_anchor_kl(logp, refs[:1], name), kl_penalty(logp, refs[0], name))
    if name == "k1":
        torch.testing.assert_close(multi_anchor_kl(logp, refs, name), logp - refs.mean(0))


def test_multi_anchor_shape_check():
    with pytest.raises(ValueError, match="J"):
        multi_anchor_kl(torch.zeros(2, 3), torch.zeros(2, 3))
