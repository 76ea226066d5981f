"""Critic-free advantages (GRPO, Dr. GRPO, RLOO, REINFORCE++) and GRPO's KL loss: hand-computed, naive loops,
padding invariance, group-order invariance, identities, the data-parallel whitening path, gradient sign."""

from __future__ import annotations

import math
import statistics

import pytest
import torch

from salsa_lightning.rl.advantages import (
    broadcast_to_tokens,
    group_advantages,
    informative_groups,
    kl_loss,
    reinforce_pp_advantages,
    rloo_advantages,
)
from salsa_lightning.rl.masked import masked_moments

NAN = float("nan")
GARBAGE = torch.tensor([NAN, float("inf"), -float("inf"), 1e30])


def random_ragged(B: int = 6, T: int = 7, seed: int = 0, left: bool = False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, generator=g, dtype=torch.float64) * 2 + 0.5
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    pos = torch.arange(T).expand(B, T)
    mask = pos >= (T - lengths[:, None]) if left else pos < lengths[:, None]
    return x, mask


def pad_with_garbage(x: torch.Tensor, mask: torch.Tensor, left: bool = False):
    """Four extra padded columns holding NaN/inf/huge values, on the right (or left)."""
    g = GARBAGE.to(x.dtype).expand(x.shape[0], 4)
    z = torch.zeros(x.shape[0], 4, dtype=mask.dtype)
    return (torch.cat([g, x], 1), torch.cat([z, mask], 1)) if left else (torch.cat([x, g], 1), torch.cat([mask, z], 1))


def random_scores(n_prompts: int = 4, group_size: int = 5, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n_prompts * group_size, generator=g, dtype=torch.float64) * 3 + 1


# two prompts, three responses each: [1, 2, 3] and [0, 0, 6]
SCORES = torch.tensor([1.0, 2.0, 3.0, 0.0, 0.0, 6.0])


# ---- GRPO / Dr. GRPO -----------------------------------------------------------------------------------------------


def test_group_advantages_hand_computed():
    # group 0: mean 2, unbiased std sqrt((1 + 0 + 1) / 2) = 1            -> -1, 0, 1
    # group 1: mean 2, deviations -2, -2, 4, unbiased var (4 + 4 + 16) / 2 = 12, std 2·sqrt(3)
    s3 = math.sqrt(3)
    expected = torch.tensor([-1.0, 0.0, 1.0, -1 / s3, -1 / s3, 2 / s3])
    torch.testing.assert_close(group_advantages(SCORES, 3, eps=0.0), expected)
    # Dr. GRPO: centred only
    torch.testing.assert_close(group_advantages(SCORES, 3, scale_by_std=False), torch.tensor([-1.0, 0, 1, -2, -2, 4]))


@pytest.mark.parametrize("scale_by_std", [True, False])
@pytest.mark.parametrize("group_size", [2, 3, 8])
def test_group_advantages_match_naive_loop(group_size, scale_by_std):
    scores = random_scores(n_prompts=3, group_size=group_size, seed=group_size)
    out = group_advantages(scores, group_size, scale_by_std=scale_by_std, eps=1e-6)
    vals = scores.tolist()
    for i, r in enumerate(vals):
        group = vals[(i // group_size) * group_size : (i // group_size + 1) * group_size]
        want = r - statistics.fmean(group)
        if scale_by_std:
            want /= statistics.stdev(group) + 1e-6  # stdev: the unbiased (n - 1) estimator, as TRL's torch.std
        assert out[i].item() == pytest.approx(want)


@pytest.mark.parametrize("scale_by_std", [True, False])
def test_group_advantages_of_equal_scores_are_zero_not_nan(scale_by_std):
    scores = torch.tensor([5.0, 5.0, 5.0, 1.0, 2.0, 3.0])
    out = group_advantages(scores, 3, scale_by_std=scale_by_std)
    assert torch.isfinite(out).all()
    assert (out[:3] == 0).all()
    # a group of one response (no baseline to compare with) is 0 as well, not NaN
    assert (group_advantages(torch.tensor([4.0, -1.0]), 1) == 0).all()


def test_group_advantages_are_standardised_within_each_group():
    out = group_advantages(random_scores(seed=1), 5, eps=0.0).view(4, 5)
    torch.testing.assert_close(out.mean(dim=1), torch.zeros(4, dtype=out.dtype))
    torch.testing.assert_close(out.std(dim=1), torch.ones(4, dtype=out.dtype))


# ---- RLOO ----------------------------------------------------------------------------------------------------------


def test_rloo_hand_computed():
    # group 0: 1 - (2+3)/2 = -1.5, 2 - (1+3)/2 = 0, 3 - (1+2)/2 = 1.5; group 1: 0 - 3, 0 - 3, 6 - 0
    torch.testing.assert_close(rloo_advantages(SCORES, 3), torch.tensor([-1.5, 0.0, 1.5, -3.0, -3.0, 6.0]))


@pytest.mark.parametrize("group_size", [2, 3, 8])
def test_rloo_matches_naive_loop_and_sums_to_zero_per_group(group_size):
    scores = random_scores(n_prompts=3, group_size=group_size, seed=10 + group_size)
    out = rloo_advantages(scores, group_size)
    vals = scores.tolist()
    for i, r in enumerate(vals):
        start = (i // group_size) * group_size
        others = [vals[j] for j in range(start, start + group_size) if j != i]
        assert out[i].item() == pytest.approx(r - sum(others) / len(others))
    torch.testing.assert_close(out.view(-1, group_size).sum(dim=1), torch.zeros(3, dtype=out.dtype))
    # RLOO is GRPO's centring rescaled by G / (G - 1)
    centred = group_advantages(scores, group_size, scale_by_std=False)
    torch.testing.assert_close(out, centred * group_size / (group_size - 1))


# ---- group-order invariance (both group estimators) ----------------------------------------------------------------

GROUP_ESTIMATORS = {
    "grpo": lambda s, G: group_advantages(s, G),
    "dr_grpo": lambda s, G: group_advantages(s, G, scale_by_std=False),
    "rloo": rloo_advantages,
}


@pytest.mark.parametrize("name", sorted(GROUP_ESTIMATORS))
def test_permuting_rows_within_groups_or_whole_groups_permutes_the_output(name):
    fn, n_prompts, G = GROUP_ESTIMATORS[name], 4, 5
    scores = random_scores(n_prompts, G, seed=2)
    out = fn(scores, G)
    g = torch.Generator().manual_seed(3)
    # within each group: row i of group k goes to a random slot of the same group
    within = torch.cat([k * G + torch.randperm(G, generator=g) for k in range(n_prompts)])
    torch.testing.assert_close(fn(scores[within], G), out[within])
    # whole groups reordered, each group's rows kept together
    groups = torch.randperm(n_prompts, generator=g)
    whole = (groups[:, None] * G + torch.arange(G)).reshape(-1)
    torch.testing.assert_close(fn(scores[whole], G), out[whole])
    # a group's advantages depend on its own scores only
    changed = scores.clone()
    changed[:G] += 100.0
    torch.testing.assert_close(fn(changed, G)[G:], out[G:])


def test_group_advantages_carry_no_gradient():
    scores = torch.randn(6, requires_grad=True)
    assert not group_advantages(scores, 3).requires_grad
    assert not rloo_advantages(scores, 3).requires_grad


# ---- REINFORCE++ ---------------------------------------------------------------------------------------------------


def naive_reinforce_pp(rewards: torch.Tensor, mask: torch.Tensor, gamma: float) -> list[list[float]]:
    """Per-row discounted return-to-go over real tokens, then whitening over all of them (unbiased std)."""
    B, T = rewards.shape
    returns = [[0.0] * T for _ in range(B)]
    for b in range(B):
        idx = [t for t in range(T) if mask[b, t]]
        for i, t in enumerate(idx):
            returns[b][t] = sum(gamma**j * rewards[b, k].item() for j, k in enumerate(idx[i:]))
    real = [returns[b][t] for b in range(B) for t in range(T) if mask[b, t]]
    mean, std = statistics.fmean(real), math.sqrt(statistics.variance(real) + 1e-8)
    return [[(returns[b][t] - mean) / std if mask[b, t] else 0.0 for t in range(T)] for b in range(B)]


def test_reinforce_pp_hand_computed():
    gamma = 0.5
    rewards = torch.tensor([[1.0, 0.0, 2.0], [1.0, 3.0, NAN]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    # row 0: G2 = 2, G1 = 0 + 0.5·2 = 1, G0 = 1 + 0.5·1 = 1.5; row 1 ends at t=1: G1 = 3, G0 = 1 + 0.5·3 = 2.5
    # real returns 1.5, 1, 2, 2.5, 3: mean 2, squared deviations .25 + 1 + 0 + .25 + 1 = 2.5, unbiased var 0.625
    s = math.sqrt(0.625)
    expected = torch.tensor([[-0.5 / s, -1.0 / s, 0.0], [0.5 / s, 1.0 / s, 0.0]])
    torch.testing.assert_close(reinforce_pp_advantages(rewards, mask, gamma), expected)


@pytest.mark.parametrize("left", [False, True])
@pytest.mark.parametrize("gamma", [1.0, 0.9])
def test_reinforce_pp_matches_naive_loop(gamma, left):
    rewards, mask = random_ragged(seed=4, left=left)
    out = reinforce_pp_advantages(rewards, mask, gamma)
    for row, want in zip(out.tolist(), naive_reinforce_pp(rewards, mask, gamma), strict=True):
        assert row == pytest.approx(want)


@pytest.mark.parametrize("left", [False, True])
def test_reinforce_pp_padding_with_garbage_changes_nothing(left):
    rewards, mask = random_ragged(seed=5, left=left)
    base = reinforce_pp_advantages(rewards, mask, 0.95)
    rp, mp = pad_with_garbage(rewards, mask, left=left)
    out = reinforce_pp_advantages(rp, mp, 0.95)
    torch.testing.assert_close(out[:, 4:] if left else out[:, :-4], base)
    assert (out[:, :4] if left else out[:, -4:]).eq(0).all()


def test_reinforce_pp_split_across_processes_equals_the_whole_batch():
    # two "ranks" hold halves of a batch; all_reduce sums their moments, as torch.distributed would
    rewards, mask = random_ragged(B=6, seed=6)
    halves = [(rewards[:3], mask[:3]), (rewards[3:], mask[3:])]
    local_moments = []
    for r, m in halves:  # first pass: record what each rank would contribute to the all-reduce
        reinforce_pp_advantages(r, m, all_reduce=lambda x: local_moments.append(x) or x)
    total = sum(local_moments)
    split = torch.cat([reinforce_pp_advantages(r, m, all_reduce=lambda _: total) for r, m in halves])
    whole = reinforce_pp_advantages(rewards, mask)
    torch.testing.assert_close(split, whole)
    assert total[0] == masked_moments(rewards, mask)[0]  # the summed moments count every real token once
    local = torch.cat([reinforce_pp_advantages(r, m) for r, m in halves])
    assert not torch.allclose(local, whole, atol=1e-3)  # whitening each half alone is the bug all_reduce prevents


def test_reinforce_pp_higher_final_reward_raises_every_earlier_return():
    mask = torch.ones(2, 3)
    out = reinforce_pp_advantages(torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, 2.0]]), mask)
    assert (out[1] > out[0]).all()


# ---- broadcast_to_tokens -------------------------------------------------------------------------------------------


def test_broadcast_hand_computed_and_naive_loop():
    out = broadcast_to_tokens(torch.tensor([1.0, -2.0]), torch.tensor([[1, 1, 0], [1, 0, 0]]))
    torch.testing.assert_close(out, torch.tensor([[1.0, 1.0, 0.0], [-2.0, 0.0, 0.0]]))
    for left in (False, True):
        _, mask = random_ragged(seed=7, left=left)
        adv = torch.randn(mask.shape[0], dtype=torch.float64)
        got = broadcast_to_tokens(adv, mask)
        want = [[adv[b].item() if mask[b, t] else 0.0 for t in range(mask.shape[1])] for b in range(mask.shape[0])]
        assert got.tolist() == want


@pytest.mark.parametrize("left", [False, True])
def test_broadcast_padding_changes_nothing(left):
    x, mask = random_ragged(seed=8)
    adv = torch.randn(mask.shape[0], dtype=torch.float64)
    _, mp = pad_with_garbage(x, mask, left=left)
    out = broadcast_to_tokens(adv, mp)
    torch.testing.assert_close(out[:, 4:] if left else out[:, :-4], broadcast_to_tokens(adv, mask))
    assert (out[:, :4] if left else out[:, -4:]).eq(0).all()


# ---- kl_loss -------------------------------------------------------------------------------------------------------


def test_kl_loss_hand_computed():
    # r = π_anchor / π_θ: token 0 r = 1 -> k3 = 0; token 1 r = 1/2 -> k3 = -1/2 + log 2; token 2 is padding
    logp = torch.tensor([[0.0, math.log(2.0), NAN]])
    anchor = torch.tensor([[0.0, 0.0, NAN]])
    mask = torch.tensor([[1, 1, 0]])
    assert kl_loss(logp, anchor, mask).item() == pytest.approx((-0.5 + math.log(2.0)) / 2)


@pytest.mark.parametrize("left", [False, True])
def test_kl_loss_matches_naive_loop_and_ignores_garbage_padding(left):
    logp, mask = random_ragged(seed=9, left=left)
    anchor = logp + torch.randn(logp.shape, generator=torch.Generator().manual_seed(10), dtype=logp.dtype)
    terms = []
    for b in range(logp.shape[0]):
        for t in range(logp.shape[1]):
            if mask[b, t]:
                d = anchor[b, t].item() - logp[b, t].item()  # log r
                terms.append(math.exp(d) - 1 - d)
    assert kl_loss(logp, anchor, mask).item() == pytest.approx(sum(terms) / len(terms))
    lp, mp = pad_with_garbage(logp, mask, left=left)
    ap, _ = pad_with_garbage(anchor, mask, left=left)
    lp.requires_grad_(True)
    loss = kl_loss(lp, ap, mp)
    assert loss.item() == pytest.approx(sum(terms) / len(terms))
    loss.backward()
    assert torch.isfinite(lp.grad).all() and (lp.grad[~mp.bool()] == 0).all()


def test_kl_loss_gradient_pushes_logp_toward_the_anchor():
    logp = torch.tensor([[-1.0, -2.0, -0.5, -3.0]], requires_grad=True)
    anchor = torch.tensor([[-2.0, -1.0, -0.5, -0.1]], requires_grad=True)
    mask = torch.ones(1, 4)
    kl_loss(logp, anchor, mask).backward()
    # d k3 / d logp = (1 - r) / n with r = exp(anchor - logp)
    torch.testing.assert_close(logp.grad, (1 - torch.exp(anchor - logp)).detach() / 4)
    # descent (-grad) has the sign of anchor - logp: up where the anchor is likelier, down where it is less likely
    assert torch.equal(torch.sign(-logp.grad), torch.sign(anchor - logp).detach())
    assert anchor.grad is None  # the anchor is a fixed target
    lp, ap = logp.detach(), anchor.detach()
    stepped = lp - 0.1 * logp.grad
    gap, moved = (ap - lp).abs(), (ap - stepped).abs()
    assert (moved[gap > 0] < gap[gap > 0]).all()  # every differing token got closer to the anchor
    assert kl_loss(stepped, ap, mask) < kl_loss(lp, ap, mask)


# ---- informative groups (DAPO's filter) ----------------------------------------------------------------------------


def test_informative_groups_hand_case():
    scores = torch.tensor([0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.25, 0.25, 0.25])
    assert informative_groups(scores, 3).tolist() == [False] * 3 + [True] * 3 + [False] * 3


@pytest.mark.parametrize("group_size", [2, 3, 5])
def test_informative_groups_are_exactly_the_rows_with_nonzero_advantage(group_size):
    g = torch.Generator().manual_seed(group_size)
    scores = torch.randint(0, 2, (6 * group_size,), generator=g).double()  # binary rewards (pass/fail)
    scores[:group_size], scores[group_size : 2 * group_size] = 0.0, 1.0  # a group of all fails, one of all passes
    keep = informative_groups(scores, group_size)
    for adv in (group_advantages(scores, group_size), rloo_advantages(scores, group_size)):
        assert torch.equal(keep, adv != 0)
    assert not keep[: 2 * group_size].any() and keep.any()


def test_informative_groups_follow_their_group_when_groups_are_reordered():
    scores = torch.tensor([1.0, 1.0, 0.0, 2.0, 3.0, 3.0])
    perm = torch.tensor([1, 2, 0])  # groups of 2, reordered
    keep = informative_groups(scores.view(3, 2)[perm].reshape(-1), 2)
    assert torch.equal(keep, informative_groups(scores, 2).view(3, 2)[perm].reshape(-1))
