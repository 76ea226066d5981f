"""Logged statistics: hand-computed values under TRL's names, padding invariance."""

from __future__ import annotations

import pytest
import torch

from salsa_lightning.rl.losses import policy_loss, value_loss
from salsa_lightning.rl.metrics import rollout_metrics, update_metrics
from salsa_lightning.rl.rewards import shape_rewards

NAN = float("nan")


def batch():
    scores = torch.tensor([1.0, 3.0])
    kl = torch.tensor([[0.5, 1.0, 0.5], [2.0, NAN, NAN]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    entropy = torch.tensor([[1.0, 2.0, 3.0], [4.0, NAN, NAN]])
    init_kl = torch.tensor([[0.1, 0.1, 0.1], [0.2, NAN, NAN]])
    return scores, kl, mask, entropy, init_kl


def test_hand_computed_rollout_metrics():
    scores, kl, mask, entropy, init_kl = batch()
    shaped = shape_rewards(scores, kl, mask, 0.5)
    m = rollout_metrics(scores, shaped, kl, mask, torch.tensor([True, False]), entropy, {"init": init_kl, "soup": kl})
    # per-sequence KL: 0.5 + 1 + 0.5 = 2 and 2 -> mean 2
    assert m["objective/kl"].item() == pytest.approx(2.0)
    assert m["objective/kl_soup"].item() == pytest.approx(2.0)
    assert m["objective/kl_init"].item() == pytest.approx((0.3 + 0.2) / 2)  # 0.25
    assert m["objective/scores"].item() == pytest.approx(2.0)  # (1 + 3) / 2
    assert m["objective/scores_std"].item() == pytest.approx(1.0)  # population std of (1, 3)
    # non-score per sequence: -0.5·2 = -1 for both -> mean -1; rlhf = mean(1 - 1, 3 - 1) = 1
    assert m["objective/non_score_reward"].item() == pytest.approx(-1.0)
    assert m["objective/rlhf_reward"].item() == pytest.approx(1.0)
    assert m["objective/entropy"].item() == pytest.approx((6.0 + 4.0) / 2)  # summed per sequence, then mean
    assert m["response_length"].item() == pytest.approx(2.0)  # (3 + 1) / 2
    assert m["val/num_eos_tokens"].item() == 1.0


def test_rollout_metrics_ignore_padding():
    scores, kl, mask, entropy, _ = batch()
    shaped = shape_rewards(scores, kl, mask, 0.5)
    base = rollout_metrics(scores, shaped, kl, mask, torch.tensor([True, True]), entropy)

    def pad(x, fill):
        return torch.cat([x, torch.full((2, 2), fill, dtype=x.dtype)], 1)

    mask_p = pad(mask, 0)
    kl_p = pad(kl, float("inf"))
    shaped_p = shape_rewards(scores, kl_p, mask_p, 0.5)
    out = rollout_metrics(scores, shaped_p, kl_p, mask_p, torch.tensor([True, True]), pad(entropy, NAN))
    assert out.keys() == base.keys()
    for key in base:
        torch.testing.assert_close(out[key], base[key])


def test_update_metrics_names_and_values():
    logp = torch.tensor([[0.1, -0.1]], requires_grad=True)
    v = torch.tensor([[1.0, 2.0]], requires_grad=True)
    mask = torch.ones(1, 2)
    pg = policy_loss(logp, torch.zeros(1, 2), torch.tensor([[1.0, -1.0]]), mask)
    vf = value_loss(v, torch.zeros(1, 2), torch.zeros(1, 2), mask)
    m = update_metrics(pg, vf)
    assert set(m) == {
        "policy/approxkl_avg",
        "policy/clipfrac_avg",
        "loss/policy_avg",
        "loss/value_avg",
        "val/clipfrac_avg",
    }
    assert m["loss/policy_avg"].item() == pytest.approx(pg.loss.item())
    assert m["policy/approxkl_avg"].item() == pytest.approx(0.5 * 0.01)  # ½·mean(0.1², 0.1²)
    assert not any(t.requires_grad for t in m.values())


def test_scores_std_over_ranks_is_the_global_batchs():
    from salsa_lightning.rl.masked import masked_moments
    from salsa_lightning.rl.rewards import shape_rewards

    scores = torch.tensor([0.0, 1.0, 5.0, 9.0])
    kl, mask = torch.zeros(4, 2), torch.ones(4, 2, dtype=torch.bool)
    has_eos = torch.ones(4, dtype=torch.bool)
    whole = rollout_metrics(scores, shape_rewards(scores, kl, mask, 0.1), kl, mask, has_eos)["objective/scores_std"]
    for mine, theirs in ((slice(0, 2), slice(2, 4)), (slice(2, 4), slice(0, 2))):

        def all_reduce(m, theirs=theirs):
            return m + masked_moments(scores[theirs], torch.ones(2, dtype=torch.bool))

        s = scores[mine]
        out = rollout_metrics(s, shape_rewards(s, kl[mine], mask[mine], 0.1), kl[mine], mask[mine], has_eos[mine],
                              all_reduce=all_reduce)  # fmt: skip
        torch.testing.assert_close(out["objective/scores_std"], whole)
    assert whole == pytest.approx(scores.std(unbiased=False).item())
