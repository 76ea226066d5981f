"""The rl/ functions chained as the PPO module will chain them (see `salsa_lightning.rl`'s docstring).

Two properties of the whole chain that no single-function test shows:
- generating with a larger `max_new_tokens` (more EOS-valued padding after every response, as
  `generate` produces with pad == EOS) changes no loss, statistic or gradient;
- at the first minibatch (policy == rollout policy) the loss gradient is the plain policy gradient.
"""

from __future__ import annotations

import pytest
import torch

from salsa_lightning import rl

EOS = PAD = 0  # SmolLM2: pad id == EOS id
V = 6


def run_chain(tokens: torch.Tensor, logits: torch.Tensor, ref_logits: torch.Tensor, values: torch.Tensor):
    """One rollout + one PPO minibatch on given tensors; returns the losses and the logits' gradient."""
    logits = logits.clone().requires_grad_(True)
    values = values.clone().requires_grad_(True)
    mask = rl.response_mask(tokens, EOS)
    logp = rl.logprobs_from_logits(logits, tokens, temperature=0.7)
    with torch.no_grad():
        ref_logp = rl.logprobs_from_logits(ref_logits, tokens, temperature=0.7)
        scores = torch.tensor([1.0, -0.5, 2.0])[: tokens.shape[0]]
        scores = rl.apply_missing_eos_penalty(scores, rl.contains_eos(tokens, EOS, mask), 1.0)
        kl = rl.kl_penalty(logp.detach(), ref_logp, "k1")
        shaped = rl.shape_rewards(scores, kl, mask, 0.1)
        gae = rl.compute_gae(shaped.rewards, values.detach(), mask, gamma=1.0, lam=0.95)
    pg = rl.policy_loss(logp, logp.detach(), gae.advantages, mask, 0.2)
    vf = rl.value_loss(values, values.detach(), gae.returns, mask, 0.2)
    loss = pg.loss + 0.1 * vf.loss
    loss.backward()
    stats = {
        "loss": loss.detach(),
        "kl": rl.masked_sum(kl, mask, dim=1).mean(),
        "entropy": rl.masked_mean(rl.entropy_from_logits(logits.detach()), mask),
        "ev": rl.explained_variance(values.detach(), gae.returns, mask),
        "rewards": shaped.rewards,
    }
    return stats, logits.grad, values.grad, gae, mask


def make_batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.tensor([[3, 4, EOS, PAD, PAD], [5, EOS, PAD, PAD, PAD], [1, 2, 3, 4, 5]])  # row 2: no EOS
    return (
        tokens,
        torch.randn(3, 5, V, generator=g),
        torch.randn(3, 5, V, generator=g),
        torch.randn(3, 5, generator=g),
    )


def test_more_trailing_padding_changes_nothing():
    """Rows 0 and 1 ended before t = 5; a longer generation budget only appends EOS-valued padding to them.

    (Row 2 never ended: a longer budget would give it a different response, so it is left out.)
    """
    tokens, logits, ref, values = make_batch()
    tokens, logits, ref, values = tokens[:2], logits[:2], ref[:2], values[:2]
    base, g_logits, g_values, _, _ = run_chain(tokens, logits, ref, values)

    extra = 4
    gen = torch.Generator().manual_seed(9)
    tokens_p = torch.cat([tokens, torch.full((2, extra), PAD)], 1)
    logits_p = torch.cat([logits, torch.randn(2, extra, V, generator=gen) * 100], 1)  # whatever the model says there
    ref_p = torch.cat([ref, torch.randn(2, extra, V, generator=gen) * 100], 1)
    values_p = torch.cat([values, torch.full((2, extra), 1e6)], 1)
    out, g_logits_p, g_values_p, _, mask_p = run_chain(tokens_p, logits_p, ref_p, values_p)

    assert not mask_p[:, 5:].any()
    torch.testing.assert_close(out["rewards"][:, :5], base["rewards"])
    for key in ("loss", "kl", "entropy", "ev"):
        torch.testing.assert_close(out[key], base[key])
    torch.testing.assert_close(g_logits_p[:, :5], g_logits)
    torch.testing.assert_close(g_values_p[:, :5], g_values)
    assert (g_logits_p[:, 5:] == 0).all() and (g_values_p[:, 5:] == 0).all()


def test_score_penalty_and_gradients_of_the_full_batch():
    tokens, logits, ref, values = make_batch()
    stats, g_logits, g_values, gae, mask = run_chain(tokens, logits, ref, values)
    assert mask.long().tolist() == [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1]]
    # scores land on EOS (t=2, t=1) and on row 2's last token, which lost 1.0 for missing its EOS
    kl_part = -0.1 * rl.kl_penalty(
        rl.logprobs_from_logits(logits, tokens, 0.7), rl.logprobs_from_logits(ref, tokens, 0.7)
    )
    score_part = stats["rewards"] - rl.masked_fill_pad(kl_part, mask)
    expected = torch.zeros(3, 5)
    expected[0, 2], expected[1, 1], expected[2, 4] = 1.0, -0.5, 2.0 - 1.0
    torch.testing.assert_close(score_part, expected)
    # first minibatch (ρ = 1): ∂loss/∂logp = -A/n on real tokens, the vanilla policy gradient
    n = mask.sum()
    logits_leaf = logits.clone().requires_grad_(True)
    logp = rl.logprobs_from_logits(logits_leaf, tokens, 0.7)
    (-(gae.advantages * logp) * mask).sum().div(n).backward()
    torch.testing.assert_close(g_logits, logits_leaf.grad)
    assert torch.isfinite(g_values).all() and (g_values[~mask] == 0).all()


@pytest.mark.parametrize("name", ["k1", "k3"])
def test_mkl_over_one_anchor_equals_ppo_and_identical_anchors_equal_one(name):
    """MKL with a single anchor is PPO; a soup of identical seeds is that seed (same log-probs)."""
    g = torch.Generator().manual_seed(5)
    logp, ref = torch.randn(2, 4, generator=g), torch.randn(2, 4, generator=g)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    ppo = rl.shape_rewards(torch.ones(2), rl.kl_penalty(logp, ref, name), mask, 0.2).rewards
    mkl1 = rl.shape_rewards(torch.ones(2), rl.multi_anchor_kl(logp, ref[None], name), mask, 0.2).rewards
    mkl2 = rl.shape_rewards(torch.ones(2), rl.multi_anchor_kl(logp, torch.stack([ref, ref]), name), mask, 0.2).rewards
    torch.testing.assert_close(mkl1, ppo)
    torch.testing.assert_close(mkl2, ppo)
