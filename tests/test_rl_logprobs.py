"""Token log-probs, entropies and the [prompt | response] shift."""

from __future__ import annotations

import math

import pytest
import torch

from salsa_lightning.errors import SalsaError
from salsa_lightning.rl.logprobs import entropy_from_logits, logprobs_from_logits, response_logits, step_logprobs


def naive_logprob(row: list[float], token: int, temperature: float = 1.0) -> float:
    z = [v / temperature for v in row]
    m = max(z)
    return z[token] - (m + math.log(sum(math.exp(v - m) for v in z)))


def naive_entropy(row: list[float], temperature: float = 1.0) -> float:
    z = [v / temperature for v in row]
    m = max(z)
    e = [math.exp(v - m) for v in z]
    s = sum(e)
    return -sum((p / s) * math.log(p / s) for p in e)


def test_hand_computed_logprobs():
    # logits (0, ln 3) -> probs (1/4, 3/4)
    logits = torch.tensor([[[0.0, math.log(3.0)], [0.0, math.log(3.0)]]])  # (1, 2, 2)
    lp = logprobs_from_logits(logits, torch.tensor([[0, 1]]))
    torch.testing.assert_close(lp, torch.tensor([[math.log(0.25), math.log(0.75)]]))
    # temperature 2: logits (0, ln(3)/2) -> probs (1, sqrt 3) / (1 + sqrt 3)
    lp2 = logprobs_from_logits(logits, torch.tensor([[0, 1]]), temperature=2.0)
    s3 = math.sqrt(3.0)
    torch.testing.assert_close(lp2, torch.tensor([[math.log(1 / (1 + s3)), math.log(s3 / (1 + s3))]]))


def test_hand_computed_entropy():
    uniform = torch.zeros(1, 1, 4)
    assert entropy_from_logits(uniform).item() == pytest.approx(math.log(4))  # ln V for uniform
    two = torch.tensor([[[0.0, math.log(3.0)]]])
    # -(1/4 ln 1/4 + 3/4 ln 3/4) = 0.5623...
    assert entropy_from_logits(two).item() == pytest.approx(-(0.25 * math.log(0.25) + 0.75 * math.log(0.75)))


@pytest.mark.parametrize("temperature", [1.0, 0.7, 1.5])
def test_matches_naive_loop(temperature):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 4, 11, generator=g, dtype=torch.float64) * 4
    tokens = torch.randint(0, 11, (3, 4), generator=g)
    lp = logprobs_from_logits(logits, tokens, temperature)
    ent = entropy_from_logits(logits, temperature)
    for b in range(3):
        for t in range(4):
            row = logits[b, t].tolist()
            assert lp[b, t].item() == pytest.approx(naive_logprob(row, tokens[b, t].item(), temperature))
            assert ent[b, t].item() == pytest.approx(naive_entropy(row, temperature))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_is_computed_in_float32(dtype):
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 5, 50, generator=g) * 5
    tokens = torch.randint(0, 50, (2, 5), generator=g)
    low = logits.to(dtype)
    want = logprobs_from_logits(low.float(), tokens)  # same rounded logits, full-precision reduction
    got = logprobs_from_logits(low, tokens)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(entropy_from_logits(low), entropy_from_logits(low.float()))


def test_rows_and_positions_are_independent_of_padding():
    """Garbage in other rows or extra (padded) positions never changes a token's log-prob."""
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 3, 7, generator=g)
    tokens = torch.randint(0, 7, (2, 3), generator=g)
    padded_logits = torch.cat([logits, torch.full((2, 2, 7), 1e4)], 1)
    padded_tokens = torch.cat([tokens, torch.zeros(2, 2, dtype=torch.long)], 1)
    torch.testing.assert_close(
        logprobs_from_logits(padded_logits, padded_tokens)[:, :3], logprobs_from_logits(logits, tokens)
    )
    torch.testing.assert_close(entropy_from_logits(padded_logits)[:, :3], entropy_from_logits(logits))


def test_gradient_raises_the_chosen_logit_and_lowers_the_others():
    logits = torch.tensor([[[0.5, -1.0, 2.0]]], requires_grad=True)
    logprobs_from_logits(logits, torch.tensor([[0]])).sum().backward()
    g = logits.grad[0, 0]
    p = torch.softmax(logits.detach()[0, 0], -1)
    torch.testing.assert_close(g, torch.tensor([1.0, 0.0, 0.0]) - p)  # d log p_0 / dz = onehot - p
    assert g[0] > 0 and (g[1:] < 0).all()


def test_entropy_gradient_sign():
    """Raising the largest logit sharpens the distribution: entropy falls."""
    logits = torch.tensor([[[0.5, -1.0, 2.0]]], requires_grad=True)
    entropy_from_logits(logits).sum().backward()
    assert logits.grad[0, 0, 2] < 0


def test_bad_temperature_is_a_salsa_error():
    with pytest.raises(SalsaError, match="temperature"):
        logprobs_from_logits(torch.zeros(1, 1, 2), torch.zeros(1, 1, dtype=torch.long), temperature=0.0)
    with pytest.raises(SalsaError, match="temperature"):
        entropy_from_logits(torch.zeros(1, 1, 2), temperature=-1.0)


def test_response_logits_takes_the_positions_that_predict_the_response():
    # sequence of length 5 = prompt 3 + response 2: response tokens 3, 4 are predicted at positions 2, 3
    per_position = torch.arange(5.0).expand(2, 5)  # value i at position i, e.g. a critic's output
    torch.testing.assert_close(response_logits(per_position, 2), torch.tensor([[2.0, 3.0], [2.0, 3.0]]))
    logits = torch.arange(5.0)[None, :, None].expand(1, 5, 4)
    assert response_logits(logits, 2).shape == (1, 2, 4)
    with pytest.raises(ValueError):
        response_logits(per_position, 5)


def test_response_logprobs_equal_a_naive_next_token_loop():
    """Full-sequence logits + response_logits give log p(y_t | x, y_<t) for each response token."""
    g = torch.Generator().manual_seed(3)
    B, P, R, V = 2, 4, 3, 9
    logits = torch.randn(B, P + R, V, generator=g, dtype=torch.float64)
    seq = torch.randint(0, V, (B, P + R), generator=g)
    lp = logprobs_from_logits(response_logits(logits, R), seq[:, P:])
    for b in range(B):
        for t in range(R):
            i = P + t  # token i is predicted by position i - 1
            assert lp[b, t].item() == pytest.approx(naive_logprob(logits[b, i - 1].tolist(), seq[b, i].item()))


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_step_logprobs_equal_the_stacked_computation(temperature, dtype):
    # `generate(output_logits=True)` hands back one (B, V) tensor per step; taken a step at a time they must give
    # what the (B, T, V) functions give on the stacked logits, and what a naive loop gives
    g = torch.Generator().manual_seed(0)
    steps = [torch.randn(3, 11, generator=g).to(dtype) * 3 for _ in range(5)]  # T = 5 steps of (B, V) = (3, 11)
    tokens = torch.randint(0, 11, (3, 5), generator=g)
    logp, entropy = step_logprobs(steps, tokens, temperature)
    stacked = torch.stack(steps, dim=1)  # (B, T, V)
    assert logp.shape == entropy.shape == (3, 5)
    torch.testing.assert_close(logp, logprobs_from_logits(stacked, tokens, temperature), rtol=0, atol=1e-6)
    torch.testing.assert_close(entropy, entropy_from_logits(stacked, temperature), rtol=0, atol=1e-6)
    for b in range(3):
        for t in range(5):
            row = (stacked[b, t] / temperature).float().tolist()  # scaled in the logits' dtype, as the functions do
            assert logp[b, t].item() == pytest.approx(naive_logprob(row, int(tokens[b, t])), abs=1e-5)
            assert entropy[b, t].item() == pytest.approx(naive_entropy(row), abs=1e-5)
