"""GAE: hand-computed, a naive per-episode loop with ragged lengths, padding invariance, whitening."""

from __future__ import annotations

import pytest
import torch

from salsa_lightning.rl.gae import compute_gae
from salsa_lightning.rl.masked import masked_mean, masked_var, masked_whiten

NAN = float("nan")


def naive_gae(rewards: list[float], values: list[float], gamma: float, lam: float):
    """One episode, textbook recursion with V after the end = 0."""
    n = len(rewards)
    adv = [0.0] * n
    last = 0.0
    for t in reversed(range(n)):
        next_v = values[t + 1] if t + 1 < n else 0.0
        delta = rewards[t] + gamma * next_v - values[t]
        last = delta + gamma * lam * last
        adv[t] = last
    return adv, [a + v for a, v in zip(adv, values, strict=True)]


def test_hand_computed_ragged():
    gamma, lam = 0.9, 0.8  # γλ = 0.72
    rewards = torch.tensor([[1.0, 0.0, 2.0], [1.0, 3.0, NAN]])
    values = torch.tensor([[0.5, 1.0, 1.5], [2.0, 1.0, NAN]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    out = compute_gae(rewards, values, mask, gamma, lam, whiten=False)
    # row 0: δ2 = 2 + 0 - 1.5 = 0.5                A2 = 0.5
    #        δ1 = 0 + 0.9·1.5 - 1 = 0.35           A1 = 0.35 + 0.72·0.5 = 0.71
    #        δ0 = 1 + 0.9·1 - 0.5 = 1.4            A0 = 1.4 + 0.72·0.71 = 1.9112
    # row 1 ends at t=1: δ1 = 3 + 0 - 1 = 2        A1 = 2
    #        δ0 = 1 + 0.9·1 - 2 = -0.1             A0 = -0.1 + 0.72·2 = 1.34
    torch.testing.assert_close(out.advantages, torch.tensor([[1.9112, 0.71, 0.5], [1.34, 2.0, 0.0]]))
    # G = A + V: 1.9112 + 0.5, 0.71 + 1, 0.5 + 1.5; 1.34 + 2, 2 + 1
    torch.testing.assert_close(out.returns, torch.tensor([[2.4112, 1.71, 2.0], [3.34, 3.0, 0.0]]))


def test_gamma_lambda_one_is_monte_carlo():
    """γ = λ = 1: A_t = Σ_{k≥t} r_k - V_t (the value terms telescope)."""
    rewards = torch.tensor([[1.0, 2.0, 3.0]])
    values = torch.tensor([[0.5, -1.0, 4.0]])
    out = compute_gae(rewards, values, torch.ones(1, 3), 1.0, 1.0, whiten=False)
    torch.testing.assert_close(out.advantages, torch.tensor([[6.0 - 0.5, 5.0 + 1.0, 3.0 - 4.0]]))
    torch.testing.assert_close(out.returns, torch.tensor([[6.0, 5.0, 3.0]]))  # reward-to-go


@pytest.mark.parametrize("left", [False, True])
@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.99, 0.9), (0.5, 0.0)])
def test_matches_naive_loop(gamma, lam, left):
    g = torch.Generator().manual_seed(0)
    B, T = 6, 9
    rewards = torch.randn(B, T, generator=g, dtype=torch.float64)
    values = torch.randn(B, T, generator=g, dtype=torch.float64)
    lengths = torch.randint(1, T + 1, (B,), generator=g).tolist()
    mask = torch.zeros(B, T, dtype=torch.bool)
    for b, n in enumerate(lengths):
        if left:
            mask[b, T - n :] = True
        else:
            mask[b, :n] = True
    out = compute_gae(rewards, values, mask, gamma, lam, whiten=False)
    for b in range(B):
        idx = [t for t in range(T) if mask[b, t]]
        adv, ret = naive_gae([rewards[b, t].item() for t in idx], [values[b, t].item() for t in idx], gamma, lam)
        assert out.advantages[b, idx].tolist() == pytest.approx(adv)
        assert out.returns[b, idx].tolist() == pytest.approx(ret)
        assert (out.advantages[b, ~mask[b]] == 0).all() and (out.returns[b, ~mask[b]] == 0).all()


@pytest.mark.parametrize("whiten", [False, True])
def test_padding_with_garbage_changes_nothing(whiten):
    g = torch.Generator().manual_seed(1)
    rewards, values = torch.randn(3, 5, generator=g), torch.randn(3, 5, generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]])
    base = compute_gae(rewards, values, mask, 0.99, 0.95, whiten=whiten)
    garbage = torch.tensor([NAN, float("inf"), 1e30]).expand(3, 3)
    pad = torch.zeros(3, 3, dtype=mask.dtype)
    out = compute_gae(
        torch.cat([rewards, garbage], 1),
        torch.cat([values, -garbage], 1),
        torch.cat([mask, pad], 1),
        0.99,
        0.95,
        whiten=whiten,
    )
    torch.testing.assert_close(out.advantages[:, :5], base.advantages)
    torch.testing.assert_close(out.returns[:, :5], base.returns)
    assert (out.advantages[:, 5:] == 0).all() and (out.returns[:, 5:] == 0).all()


def test_whitened_advantages_have_mean_zero_var_one_and_returns_stay_raw():
    g = torch.Generator().manual_seed(2)
    rewards, values = torch.randn(4, 6, generator=g) * 5 + 3, torch.randn(4, 6, generator=g)
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2, [1] * 2 + [0] * 4, [1] + [0] * 5])
    raw = compute_gae(rewards, values, mask, 1.0, 0.95, whiten=False)
    out = compute_gae(rewards, values, mask, 1.0, 0.95, whiten=True)
    assert masked_mean(out.advantages, mask).item() == pytest.approx(0.0, abs=1e-6)
    assert masked_var(out.advantages, mask).item() == pytest.approx(1.0, abs=1e-5)
    torch.testing.assert_close(out.advantages, masked_whiten(raw.advantages, mask))
    # the value target is A + V of the raw advantages, never of the whitened ones
    torch.testing.assert_close(out.returns, raw.returns)
    torch.testing.assert_close(out.returns, (raw.advantages + values) * mask)


def test_no_gradient_flows_into_targets():
    values = torch.randn(2, 3, requires_grad=True)
    out = compute_gae(torch.randn(2, 3), values, torch.ones(2, 3), 1.0, 0.95)
    assert not out.advantages.requires_grad and not out.returns.requires_grad


def test_higher_reward_raises_the_advantage_of_earlier_tokens():
    """Sign check on the targets: a larger final reward increases every A_t of the episode (γλ > 0)."""
    values, mask = torch.zeros(1, 3), torch.ones(1, 3)
    low = compute_gae(torch.tensor([[0.0, 0.0, 1.0]]), values, mask, 1.0, 0.95, whiten=False).advantages
    high = compute_gae(torch.tensor([[0.0, 0.0, 2.0]]), values, mask, 1.0, 0.95, whiten=False).advantages
    assert (high > low).all()
