"""masked_sum / mean / var / whiten: hand-computed, naive loops, padding invariance, gradients."""

from __future__ import annotations

import math

import pytest
import torch

from salsa_lightning.rl.masked import (
    masked_count,
    masked_mean,
    masked_moments,
    masked_sum,
    masked_var,
    masked_whiten,
    mean_var_from_moments,
)

GARBAGE = (float("nan"), float("inf"), -float("inf"), 1e30)


def pad_with_garbage(x: torch.Tensor, mask: torch.Tensor, n: int = 4, left: bool = False):
    """Extra padded columns holding NaN/inf/huge values, on the right (or left)."""
    g = torch.tensor([GARBAGE[i % len(GARBAGE)] for i in range(n)], dtype=x.dtype).expand(x.shape[0], n)
    z = torch.zeros(x.shape[0], n, dtype=mask.dtype)
    if left:
        return torch.cat([g, x], 1), torch.cat([z, mask], 1)
    return torch.cat([x, g], 1), torch.cat([mask, z], 1)


def random_ragged(B: int = 5, T: int = 7, seed: int = 0, left: bool = False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, generator=g, dtype=torch.float64) * 3 + 1
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    pos = torch.arange(T).expand(B, T)
    mask = pos >= (T - lengths[:, None]) if left else pos < lengths[:, None]
    return x, mask


def naive_real_values(x, mask):
    return [x[b, t].item() for b in range(x.shape[0]) for t in range(x.shape[1]) if mask[b, t]]


# ---- hand-computed -------------------------------------------------------------------------------------------------

X = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
M = torch.tensor([[1, 1, 0], [1, 0, 0]])


def test_hand_computed_sum_mean_var():
    # real values: 1, 2, 4
    assert masked_sum(X, M).item() == 7.0  # 1 + 2 + 4
    assert masked_mean(X, M).item() == pytest.approx(7 / 3)
    # deviations from 7/3: -4/3, -1/3, 5/3; squares 16/9 + 1/9 + 25/9 = 42/9
    assert masked_var(X, M, unbiased=False).item() == pytest.approx(42 / 9 / 3)  # 14/9
    assert masked_var(X, M, unbiased=True).item() == pytest.approx(42 / 9 / 2)  # 7/3
    assert masked_count(M).item() == 3


def test_hand_computed_along_dim():
    assert masked_sum(X, M, dim=1).tolist() == [3.0, 4.0]  # 1 + 2, 4
    assert masked_mean(X, M, dim=1).tolist() == [1.5, 4.0]  # 3 / 2, 4 / 1
    assert masked_mean(X, M, dim=0).tolist() == [2.5, 2.0, 0.0]  # (1 + 4) / 2, 2 / 1, no real token -> 0


def test_hand_computed_whiten():
    # real 1, 2, 4: mean 7/3, unbiased std sqrt(7/3)
    w = masked_whiten(X, M, eps=0.0)
    s = math.sqrt(7 / 3)
    expected = [[(1 - 7 / 3) / s, (2 - 7 / 3) / s, 0.0], [(4 - 7 / 3) / s, 0.0, 0.0]]
    torch.testing.assert_close(w, torch.tensor(expected))
    w_keep = masked_whiten(X, M, shift_mean=False, eps=0.0)
    torch.testing.assert_close(w_keep[M.bool()], torch.tensor([expected[0][0], expected[0][1], expected[1][0]]) + 7 / 3)


# ---- naive loops ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("left", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_naive_loop(seed, left):
    x, mask = random_ragged(seed=seed, left=left)
    vals = naive_real_values(x, mask)
    n = len(vals)
    mean = sum(vals) / n
    var_b = sum((v - mean) ** 2 for v in vals) / n
    var_u = sum((v - mean) ** 2 for v in vals) / (n - 1)
    assert masked_sum(x, mask).item() == pytest.approx(sum(vals))
    assert masked_mean(x, mask).item() == pytest.approx(mean)
    assert masked_var(x, mask, unbiased=False).item() == pytest.approx(var_b)
    assert masked_var(x, mask, unbiased=True).item() == pytest.approx(var_u)
    row_means = [sum(x[b, t].item() for t in range(x.shape[1]) if mask[b, t]) / mask[b].sum().item() for b in range(5)]
    assert masked_mean(x, mask, dim=1).tolist() == pytest.approx(row_means)
    w = masked_whiten(x, mask, eps=0.0)
    for b in range(x.shape[0]):
        for t in range(x.shape[1]):
            want = (x[b, t].item() - mean) / math.sqrt(var_u) if mask[b, t] else 0.0
            assert w[b, t].item() == pytest.approx(want)


def test_whiten_gives_mean_zero_var_one_over_real_tokens_only():
    x, mask = random_ragged(B=8, T=9, seed=3)
    x = x.masked_fill(~mask, 1e6)  # huge padding would dominate an unmasked mean/var
    w = masked_whiten(x, mask)
    assert masked_mean(w, mask).item() == pytest.approx(0.0, abs=1e-12)
    assert masked_var(w, mask, unbiased=True).item() == pytest.approx(1.0, abs=1e-6)
    assert (w[~mask] == 0).all()
    kept = masked_whiten(x, mask, shift_mean=False)
    assert masked_mean(kept, mask).item() == pytest.approx(masked_mean(x, mask).item())
    assert masked_var(kept, mask).item() == pytest.approx(1.0, abs=1e-6)


# ---- padding invariance --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("left", [False, True])
def test_padding_with_garbage_changes_nothing(left):
    x, mask = random_ragged(seed=4)
    xp, mp = pad_with_garbage(x, mask, left=left)
    for fn in (masked_sum, masked_mean, masked_var):
        torch.testing.assert_close(fn(xp, mp), fn(x, mask))
    torch.testing.assert_close(masked_mean(xp, mp, dim=1), masked_mean(x, mask, dim=1))
    w, wp = masked_whiten(x, mask), masked_whiten(xp, mp)
    torch.testing.assert_close(wp[:, 4:] if left else wp[:, :-4], w)
    assert torch.isfinite(wp).all()


# ---- edge cases and gradients --------------------------------------------------------------------------------------


def test_no_real_tokens_gives_zero_not_nan():
    x = torch.tensor([[float("nan"), 1.0]], requires_grad=True)
    mask = torch.zeros(1, 2)
    out = masked_mean(x, mask)
    assert out.item() == 0.0
    out.backward()
    assert (x.grad == 0).all()
    assert masked_var(x, mask).item() == 0.0


def test_unbiased_var_of_a_single_token_is_zero():
    assert masked_var(torch.tensor([[5.0, 7.0]]), torch.tensor([[1, 0]]), unbiased=True).item() == 0.0


def test_mean_gradient_is_one_over_n_on_real_tokens_and_zero_on_nan_padding():
    x = torch.tensor([[1.0, 2.0, float("nan")], [3.0, float("inf"), float("nan")]], requires_grad=True)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    masked_mean(x, mask).backward()
    torch.testing.assert_close(x.grad, torch.tensor([[1 / 3, 1 / 3, 0.0], [1 / 3, 0.0, 0.0]]))


def test_whiten_gradient_is_finite_with_garbage_padding():
    x, mask = random_ragged(seed=5)
    xp, mp = pad_with_garbage(x, mask)
    xp.requires_grad_(True)
    (masked_whiten(xp, mp) * torch.arange(xp.shape[1])).sum().backward()
    assert torch.isfinite(xp.grad).all()
    assert (xp.grad[~mp.bool()] == 0).all()


def test_whitening_split_across_processes_equals_whitening_the_whole_batch():
    # two "ranks" hold halves of a batch; all_reduce sums their moments, as torch.distributed would
    g = torch.Generator().manual_seed(5)
    x = torch.randn(6, 7, generator=g) * 3 + 1
    mask = torch.rand(6, 7, generator=g) > 0.3
    x[~mask] = float("nan")  # padding never counts
    halves = [(x[:3], mask[:3]), (x[3:], mask[3:])]
    total = sum(masked_moments(v, m) for v, m in halves)
    split = torch.cat([masked_whiten(v, m, eps=0.0, all_reduce=lambda _: total) for v, m in halves])
    torch.testing.assert_close(split, masked_whiten(x, mask, eps=0.0), rtol=1e-6, atol=1e-6)
    # and it differs from each half whitened on its own (the bug a per-rank whitening would be)
    local = torch.cat([masked_whiten(v, m, eps=0.0) for v, m in halves])
    assert not torch.allclose(local, split, atol=1e-3)


def test_moments_give_the_masked_mean_and_variance():
    g = torch.Generator().manual_seed(6)
    x = torch.randn(4, 5, generator=g)
    mask = torch.rand(4, 5, generator=g) > 0.4
    mean, var = mean_var_from_moments(masked_moments(x, mask))
    torch.testing.assert_close(mean.float(), masked_mean(x, mask))
    torch.testing.assert_close(var.float(), masked_var(x, mask))
    one = torch.zeros(4, 5, dtype=torch.bool)
    one[0, 0] = True  # a single token: no Bessel correction, variance 0
    assert mean_var_from_moments(masked_moments(x, one))[1] == 0
    assert mean_var_from_moments(masked_moments(x, torch.zeros_like(one))) == (0, 0)
