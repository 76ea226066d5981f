"""Reward shaping: -β·KL per token, the score at the last REAL token (trl#3750), missing-EOS penalty."""

from __future__ import annotations

import pytest
import torch

from salsa_lightning.errors import SalsaError
from salsa_lightning.rl.kl_control import make_kl_controller
from salsa_lightning.rl.rewards import apply_missing_eos_penalty, normalize_scores, shape_rewards
from salsa_lightning.rl.sequences import contains_eos, response_mask

NAN = float("nan")


def test_hand_computed_shaping():
    scores = torch.tensor([1.0, -2.0])
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.4, NAN, NAN]])  # garbage KL on padding
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    out = shape_rewards(scores, kl, mask, kl_coef=0.5)
    # non-score: -0.5·kl on real tokens -> [-0.05, -0.1, -0.15], [-0.2, 0, 0]
    torch.testing.assert_close(out.non_score_rewards, torch.tensor([[-0.05, -0.1, -0.15], [-0.2, 0.0, 0.0]]))
    # + score at the last real token: -0.15 + 1 = 0.85; -0.2 - 2 = -2.2
    torch.testing.assert_close(out.rewards, torch.tensor([[-0.05, -0.1, 0.85], [-2.2, 0.0, 0.0]]))


def test_score_lands_on_the_eos_not_on_padding_when_pad_equals_eos():
    """The SmolLM2 case: pad id == EOS id, ragged lengths. 'Last non-pad' from token ids would be wrong."""
    eos = pad = 0
    tokens = torch.tensor([[7, 8, eos, pad, pad], [7, eos, pad, pad, pad], [7, 8, 9, 10, 11]])
    mask = response_mask(tokens, eos)
    out = shape_rewards(torch.tensor([10.0, 20.0, 30.0]), torch.zeros(3, 5), mask, kl_coef=0.1)
    expected = torch.zeros(3, 5)
    expected[0, 2] = 10.0  # on row 0's EOS
    expected[1, 1] = 20.0  # on row 1's EOS
    expected[2, 4] = 30.0  # row 2 was cut at max_new_tokens: its last generated token
    torch.testing.assert_close(out.rewards, expected)


def test_matches_naive_loop_with_ragged_left_and_right_padding():
    g = torch.Generator().manual_seed(0)
    B, T, beta = 6, 8, 0.3
    scores = torch.randn(B, generator=g, dtype=torch.float64)
    kl = torch.randn(B, T, generator=g, dtype=torch.float64)
    lengths = torch.randint(1, T + 1, (B,), generator=g).tolist()
    for left in (False, True):
        mask = torch.zeros(B, T, dtype=torch.bool)
        for b, n in enumerate(lengths):
            if left:
                mask[b, T - n :] = True
            else:
                mask[b, :n] = True
        out = shape_rewards(scores, kl, mask, beta)
        for b in range(B):
            real = [t for t in range(T) if mask[b, t]]
            for t in range(T):
                want = -beta * kl[b, t].item() if mask[b, t] else 0.0
                if t == real[-1]:
                    want += scores[b].item()
                assert out.rewards[b, t].item() == pytest.approx(want)


def test_padding_with_garbage_changes_nothing():
    g = torch.Generator().manual_seed(1)
    scores, kl = torch.randn(3, generator=g), torch.randn(3, 4, generator=g)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]])
    base = shape_rewards(scores, kl, mask, 0.2)
    kl_p = torch.cat([kl, torch.tensor([NAN, float("inf"), 1e30]).expand(3, 3)], 1)
    mask_p = torch.cat([mask, torch.zeros(3, 3, dtype=mask.dtype)], 1)
    out = shape_rewards(scores, kl_p, mask_p, 0.2)
    torch.testing.assert_close(out.rewards[:, :4], base.rewards)
    assert (out.rewards[:, 4:] == 0).all() and torch.isfinite(out.rewards).all()


def test_row_without_real_tokens_gets_no_score():
    out = shape_rewards(torch.tensor([5.0, 1.0]), torch.zeros(2, 2), torch.tensor([[0, 0], [1, 0]]), 0.1)
    assert out.rewards.tolist() == [[0.0, 0.0], [1.0, 0.0]]


def test_reward_falls_as_kl_rises():
    kl = torch.tensor([[0.5, 1.0]], requires_grad=True)
    shape_rewards(torch.tensor([1.0]), kl, torch.ones(1, 2), 0.2).rewards.sum().backward()
    torch.testing.assert_close(kl.grad, torch.tensor([[-0.2, -0.2]]))  # d r_t / d kl_t = -β


def test_zero_beta_leaves_only_the_score():
    out = shape_rewards(torch.tensor([3.0]), torch.tensor([[1.0, 2.0]]), torch.ones(1, 2), 0.0)
    assert out.rewards.tolist() == [[0.0, 3.0]]


@pytest.mark.parametrize("beta", [-0.1, float("nan")])
def test_bad_beta_is_a_salsa_error_where_it_is_configured(beta):
    from salsa_lightning.ppo.config import PPOSpec

    # checked once, when the config is parsed (and by the KL controllers), not on every shape_rewards call
    with pytest.raises(SalsaError, match="kl_coef"):
        PPOSpec(kl_coef=beta)
    with pytest.raises(SalsaError, match="kl_coef"):
        make_kl_controller(beta)


def test_missing_eos_penalty_hand_computed():
    tokens = torch.tensor([[5, 2, 2], [5, 6, 7]])  # row 0 ended with EOS 2, row 1 was truncated
    mask = response_mask(tokens, 2)
    has_eos = contains_eos(tokens, 2, mask)
    scores = torch.tensor([0.5, 0.5])
    assert apply_missing_eos_penalty(scores, has_eos, 1.0).tolist() == [0.5, -0.5]  # 0.5 - 1.0 on row 1
    assert apply_missing_eos_penalty(scores, has_eos, None) is scores
    from salsa_lightning.ppo.config import PPOSpec

    with pytest.raises(SalsaError, match="missing_eos_penalty"):
        PPOSpec(missing_eos_penalty=-1.0)


def test_normalize_scores():
    assert normalize_scores(torch.tensor([3.0, 1.0]), mean=1.0, std=2.0).tolist() == [1.0, 0.0]  # (3-1)/2, (1-1)/2


@pytest.mark.parametrize("std", [0.0, -1.0, float("nan")])
def test_bad_stored_reward_std_is_refused_where_the_stats_are_read(tmp_path, std):
    import json

    from salsa_lightning.reward.model import normalization_stats, reward_stats
    from salsa_lightning.stage import MANIFEST_NAME

    (tmp_path / MANIFEST_NAME).write_text(json.dumps({"stage": "reward", "reward_stats": {"mean": 0.0, "std": std}}))
    with pytest.raises(SalsaError, match="std"):
        normalization_stats(tmp_path)
    assert reward_stats(tmp_path)["std"] == std or std != std  # read as stored: only normalising refuses it
