"""Clipped policy and value losses, approx-KL, clip fractions, explained variance."""

from __future__ import annotations

import math

import pytest
import torch

from salsa_lightning.rl.losses import approx_kl, explained_variance, policy_loss, value_loss

NAN = float("nan")


# ---- policy loss ---------------------------------------------------------------------------------------------------


def test_policy_loss_hand_computed():
    ratios = [1.5, 0.5, 1.1]
    logp = torch.tensor([[math.log(r) for r in ratios] + [NAN]])  # old_logp = 0, so ρ = exp(logp)
    old = torch.tensor([[0.0, 0.0, 0.0, NAN]])
    adv = torch.tensor([[1.0, 1.0, -2.0, NAN]])
    mask = torch.tensor([[1, 1, 1, 0]])
    out = policy_loss(logp, old, adv, mask, cliprange=0.2)
    # t0: ρ=1.5, A=1:  -1.5 vs -A·1.2 = -1.2 -> max -1.2 (clipped term wins)
    # t1: ρ=0.5, A=1:  -0.5 vs -A·0.8 = -0.8 -> max -0.5 (unclipped wins: no clip for A>0 below 1-ε)
    # t2: ρ=1.1, A=-2:  2.2 vs 2.2            -> 2.2 (inside the range, no clip)
    assert out.loss.item() == pytest.approx((-1.2 - 0.5 + 2.2) / 3)  # 0.1667
    assert out.clipfrac.item() == pytest.approx(1 / 3)
    torch.testing.assert_close(out.pg_losses[0, :3], torch.tensor([-1.5, -0.5, 2.2]))
    torch.testing.assert_close(out.pg_losses2[0, :3], torch.tensor([-1.2, -0.8, 2.2]))
    # approx-KL = ½·mean(ln²1.5, ln²0.5, ln²1.1) = ½·(0.164402 + 0.480453 + 0.009084)/3 = 0.108990
    assert out.approx_kl.item() == pytest.approx(0.108990, abs=1e-6)
    assert out.ratio[0, 3].item() == 1.0  # padding: ratio forced to 1, not NaN


def naive_policy_loss(logp, old, adv, mask, eps):
    terms, clipped = [], 0
    for b in range(logp.shape[0]):
        for t in range(logp.shape[1]):
            if not mask[b, t]:
                continue
            r = math.exp(logp[b, t] - old[b, t])
            a = adv[b, t].item()
            l1, l2 = -a * r, -a * min(max(r, 1 - eps), 1 + eps)
            terms.append(max(l1, l2))
            clipped += l2 > l1
    return sum(terms) / len(terms), clipped / len(terms)


def naive_value_loss(v, v_old, g, mask, eps):
    terms, clipped = [], 0
    for b in range(v.shape[0]):
        for t in range(v.shape[1]):
            if not mask[b, t]:
                continue
            vb, vo, gb = v[b, t].item(), v_old[b, t].item(), g[b, t].item()
            vc = vo + min(max(vb - vo, -eps), eps)
            l1, l2 = (vb - gb) ** 2, (vc - gb) ** 2
            terms.append(max(l1, l2))
            clipped += l2 > l1
    return 0.5 * sum(terms) / len(terms), clipped / len(terms)


def rollout(seed: int, B: int = 4, T: int = 6):
    g = torch.Generator().manual_seed(seed)
    x = [torch.randn(B, T, generator=g, dtype=torch.float64) for _ in range(5)]
    logp, old = x[0] * 0.3 - 2, x[1] * 0.3 - 2  # ratios spread across and beyond [0.8, 1.2]
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    mask = torch.arange(T) < lengths[:, None]
    return logp, old, x[2], x[3], x[4], mask  # logp, old_logp, advantages/values, old values, returns, mask


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_losses_match_naive_loops(seed):
    logp, old, adv, v_old, g, mask = rollout(seed)
    v = v_old + torch.randn_like(v_old) * 0.5
    out = policy_loss(logp, old, adv, mask, 0.2)
    want, want_frac = naive_policy_loss(logp, old, adv, mask, 0.2)
    assert out.loss.item() == pytest.approx(want)
    assert out.clipfrac.item() == pytest.approx(want_frac)
    vf = value_loss(v, v_old, g, mask, 0.2)
    want_v, want_vfrac = naive_value_loss(v, v_old, g, mask, 0.2)
    assert vf.loss.item() == pytest.approx(want_v)
    assert vf.clipfrac.item() == pytest.approx(want_vfrac)
    n = mask.sum().item()
    want_kl = 0.5 * sum((logp[b, t] - old[b, t]).item() ** 2 for b in range(4) for t in range(6) if mask[b, t]) / n
    assert approx_kl(logp, old, mask).item() == pytest.approx(want_kl)


def test_losses_ignore_garbage_padding_and_give_it_zero_gradient():
    logp, old, adv, v_old, g, mask = rollout(3)
    v = v_old + 0.3
    base_pg = policy_loss(logp, old, adv, mask).loss
    base_vf = value_loss(v, v_old, g, mask).loss
    garbage = torch.tensor([NAN, float("inf"), -float("inf")], dtype=torch.float64).expand(4, 3)

    def pad(x):
        return torch.cat([x, garbage], 1)

    mask_p = torch.cat([mask, torch.zeros(4, 3, dtype=torch.bool)], 1)
    logp_p = pad(logp).requires_grad_(True)
    v_p = pad(v).requires_grad_(True)
    pg = policy_loss(logp_p, pad(old), pad(adv), mask_p)
    vf = value_loss(v_p, pad(v_old), pad(g), mask_p)
    torch.testing.assert_close(pg.loss, base_pg)
    torch.testing.assert_close(vf.loss, base_vf)
    (pg.loss + vf.loss).backward()
    for grad in (logp_p.grad, v_p.grad):
        assert torch.isfinite(grad).all()
        assert (grad[~mask_p] == 0).all()


@pytest.mark.parametrize(
    "ratio,adv,sign",
    [
        (1.0, 1.0, -1),  # A > 0 inside the range: raise logp (gradient descent direction is +)
        (1.1, 1.0, -1),
        (0.5, 1.0, -1),  # A > 0 below 1-ε: the max keeps the unclipped term, still pushes up
        (1.5, 1.0, 0),  # A > 0 above 1+ε: the clip binds, no gradient
        (1.0, -1.0, 1),  # A < 0 inside the range: lower logp
        (0.5, -1.0, 0),  # A < 0 below 1-ε: the clip binds
        (1.5, -1.0, 1),  # A < 0 above 1+ε: unclipped term kept, keeps pushing down
    ],
)
def test_policy_gradient_sign(ratio, adv, sign):
    logp = torch.tensor([[math.log(ratio)]], requires_grad=True)
    policy_loss(logp, torch.zeros(1, 1), torch.tensor([[adv]]), torch.ones(1, 1), cliprange=0.2).loss.backward()
    grad = logp.grad.item()
    if sign == 0:
        assert grad == 0.0
    else:
        assert math.copysign(1.0, grad) == sign
        assert grad == pytest.approx(-adv * ratio)  # d(-A·ρ)/d logp = -A·ρ


def test_policy_loss_does_not_backprop_into_old_logp_or_advantages():
    old = torch.zeros(1, 2, requires_grad=True)
    adv = torch.ones(1, 2, requires_grad=True)
    logp = torch.zeros(1, 2, requires_grad=True)
    policy_loss(logp, old, adv, torch.ones(1, 2)).loss.backward()
    assert old.grad is None and adv.grad is None


# ---- value loss ----------------------------------------------------------------------------------------------------


def test_value_loss_hand_computed():
    v = torch.tensor([[1.0, 2.0, NAN]])
    v_old = torch.tensor([[0.5, 2.0, NAN]])
    g = torch.tensor([[2.0, 1.0, NAN]])
    mask = torch.tensor([[1, 1, 0]])
    out = value_loss(v, v_old, g, mask, cliprange_value=0.2)
    # t0: V - V_old = 0.5 -> clipped 0.2 -> V_c = 0.7; (1-2)² = 1 vs (0.7-2)² = 1.69 -> 1.69 (clipped)
    # t1: V = V_old = 2 -> V_c = 2; (2-1)² = 1 vs 1 -> 1
    assert out.loss.item() == pytest.approx(0.5 * (1.69 + 1.0) / 2)  # 0.6725
    assert out.clipfrac.item() == pytest.approx(0.5)
    # unclipped: ½·(1 + 1)/2 = 0.5
    assert value_loss(v, v_old, g, mask, cliprange_value=None).loss.item() == pytest.approx(0.5)


def test_value_gradient_moves_v_toward_g():
    g = torch.tensor([[1.0, 1.0]])
    v = torch.tensor([[1.1, 0.9]], requires_grad=True)  # above and below G, inside the clip range
    v_old = torch.tensor([[1.0, 1.0]])
    value_loss(v, v_old, g, torch.ones(1, 2), 0.2).loss.backward()
    torch.testing.assert_close(v.grad, torch.tensor([[0.05, -0.05]]))  # ½·2·(V-G)/2: descent moves V to G
    # a step of gradient descent shrinks the error
    stepped = v.detach() - 1.0 * v.grad
    assert ((stepped - g).abs() < (v.detach() - g).abs()).all()


def test_value_gradient_is_zero_where_the_clip_binds():
    # V moved 0.5 from V_old (beyond ε_v = 0.2): the clipped error 1.69 > 1 is the max, constant in V
    v = torch.tensor([[1.0]], requires_grad=True)
    value_loss(v, torch.tensor([[0.5]]), torch.tensor([[2.0]]), torch.ones(1, 1), 0.2).loss.backward()
    assert v.grad.item() == 0.0


# ---- explained variance --------------------------------------------------------------------------------------------


def test_explained_variance_hand_computed():
    g = torch.tensor([[1.0, 2.0, 3.0, NAN]])
    mask = torch.tensor([[1, 1, 1, 0]])
    assert explained_variance(torch.tensor([[1.0, 2.0, 3.0, NAN]]), g, mask).item() == pytest.approx(1.0)
    # V = 2 (constant): Var[G - V] = Var[G] -> 0
    assert explained_variance(torch.full((1, 4), 2.0), g, mask).item() == pytest.approx(0.0)
    # V = (1, 2, 2): G - V = (0, 0, 1), Var = 2/9; Var[G] = 2/3 -> 1 - (2/9)/(2/3) = 2/3
    assert explained_variance(torch.tensor([[1.0, 2.0, 2.0, 0.0]]), g, mask).item() == pytest.approx(2 / 3)
    # constant returns: undefined
    assert math.isnan(explained_variance(torch.zeros(1, 3), torch.ones(1, 3), torch.ones(1, 3)).item())


def test_explained_variance_matches_naive_loop():
    _, _, v, _, g, mask = rollout(4)
    gs = [g[b, t].item() for b in range(4) for t in range(6) if mask[b, t]]
    es = [(g[b, t] - v[b, t]).item() for b in range(4) for t in range(6) if mask[b, t]]

    def var(xs):
        m = sum(xs) / len(xs)
        return sum((x - m) ** 2 for x in xs) / len(xs)

    assert explained_variance(v, g, mask).item() == pytest.approx(1 - var(es) / var(gs))


def test_explained_variance_over_ranks_is_the_global_batchs():
    # two "ranks" with different halves: the global statistic is not the mean of the halves' ratios
    from salsa_lightning.rl.masked import masked_moments

    g = torch.Generator().manual_seed(7)
    values, returns = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g) * 3
    mask = torch.ones(6, 5, dtype=torch.bool)
    mask[1, 3:] = False
    halves = [(slice(0, 3)), (slice(3, 6))]
    other = {0: 1, 1: 0}

    def all_reduce_for(rank):
        o = halves[other[rank]]

        def reduce(moments):
            # the other rank's contribution of the same shape: both tensors of moments, stacked as the caller did
            theirs = torch.stack([masked_moments(returns[o], mask[o]), masked_moments(returns[o] - values[o], mask[o])])
            return moments + (theirs if moments.dim() == 2 else theirs[0])

        return reduce

    whole = explained_variance(values, returns, mask)
    per_rank = [
        explained_variance(values[h], returns[h], mask[h], all_reduce=all_reduce_for(r)) for r, h in enumerate(halves)
    ]
    for ev in per_rank:
        torch.testing.assert_close(ev, whole)
    mean_of_ratios = sum(explained_variance(values[h], returns[h], mask[h]) for h in halves) / 2
    assert not torch.allclose(mean_of_ratios, whole)  # what averaging the ranks' values used to log
