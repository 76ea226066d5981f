"""Pure reward-model math: hand cases, a naive loop, padding invariance, gradient sign."""

from __future__ import annotations

import math

import torch

from salsa_lightning.reward.losses import bradley_terry_loss, pairwise_stats
from salsa_lightning.rl.sequences import gather_last, last_token_index


def test_bradley_terry_hand_case():
    chosen, rejected = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    # -log σ(1) = log(1 + e^-1) = 0.31326; -log σ(-1) = log(1 + e) = 1.31326; mean = 0.81326
    expected = (math.log(1 + math.exp(-1)) + math.log(1 + math.e)) / 2
    assert abs(float(bradley_terry_loss(chosen, rejected)) - expected) < 1e-6
    # margin 1 turns the first pair's difference into 0: -log σ(0) = log 2; the second into -2: log(1 + e²)
    expected_m = (math.log(2) + math.log(1 + math.e**2)) / 2
    assert abs(float(bradley_terry_loss(chosen, rejected, margin=1.0)) - expected_m) < 1e-6
    # centering adds coef * mean((r_c + r_r)²) = 0.1 * mean(1, 1) = 0.1
    assert abs(float(bradley_terry_loss(chosen, rejected, center_rewards_coefficient=0.1)) - expected - 0.1) < 1e-6


def test_bradley_terry_matches_naive_loop():
    g = torch.Generator().manual_seed(0)
    c, r, m = torch.randn(7, generator=g), torch.randn(7, generator=g), torch.rand(7, generator=g)
    naive = sum(-math.log(1 / (1 + math.exp(-(float(c[i]) - float(r[i]) - float(m[i]))))) for i in range(7)) / 7
    assert abs(float(bradley_terry_loss(c, r, m)) - naive) < 1e-5


def test_gradient_raises_chosen_and_lowers_rejected():
    c, r = torch.zeros(3, requires_grad=True), torch.zeros(3, requires_grad=True)
    bradley_terry_loss(c, r).backward()
    assert (c.grad < 0).all() and (r.grad > 0).all()  # descending the loss pushes r_c up, r_r down


def test_last_token_from_mask_any_padding_side():
    right = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    left = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1]])
    assert last_token_index(right).tolist() == [2, 4, 0]
    assert last_token_index(left).tolist() == [4, 4, 4]


def test_gather_last_ignores_padding_values():
    values = torch.tensor([[1.0, 2.0, 3.0, 99.0], [5.0, 6.0, -7.0, -99.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 0]])
    assert gather_last(values, mask).tolist() == [3.0, -7.0]
    garbage = values.clone()
    garbage[:, 3] = torch.randn(2) * 1e6
    assert torch.equal(gather_last(garbage, mask), gather_last(values, mask))


def test_pairwise_stats():
    s = pairwise_stats(torch.tensor([2.0, 0.0, 1.0]), torch.tensor([1.0, 0.0, 3.0]))
    assert abs(float(s["accuracy"]) - 1 / 3) < 1e-6  # tie counts as wrong
    assert abs(float(s["margin"]) - (1 + 0 - 2) / 3) < 1e-6
