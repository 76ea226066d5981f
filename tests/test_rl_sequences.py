"""Response masks, EOS detection, last-token indices and position ids — with pad == EOS (SmolLM2)."""

from __future__ import annotations

import torch

from salsa_lightning.rl.sequences import contains_eos, last_token_index, position_ids_from_mask, response_mask

EOS = 2


def naive_mask(tokens, eos_ids, generated=None):
    out = []
    for b, row in enumerate(tokens.tolist()):
        seen_eos, mrow = False, []
        for t, tok in enumerate(row):
            gen = True if generated is None else bool(generated[b, t])
            mrow.append(gen and not seen_eos)
            if gen and tok in eos_ids:
                seen_eos = True
        out.append(mrow)
    return torch.tensor(out)


def test_hand_computed_mask_with_pad_equal_to_eos():
    # pad == EOS == 2: row 0 stops at t=1 and is padded with 2s; row 1 is cut at max_new_tokens; row 2 is EOS at once
    tokens = torch.tensor([[5, 2, 2, 2], [5, 6, 7, 8], [2, 2, 2, 2]])
    expected = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]).bool()
    assert torch.equal(response_mask(tokens, EOS), expected)
    assert contains_eos(tokens, EOS, expected).tolist() == [True, False, True]
    assert last_token_index(expected).tolist() == [1, 3, 0]


def test_pad_different_from_eos():
    tokens = torch.tensor([[5, 2, 0, 0], [5, 6, 7, 8]])  # pad 0 after EOS 2
    assert response_mask(tokens, EOS).long().tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]


def test_several_eos_ids():
    tokens = torch.tensor([[5, 9, 2, 1], [5, 2, 9, 1]])
    assert response_mask(tokens, [2, 9]).long().tolist() == [[1, 1, 0, 0], [1, 1, 0, 0]]
    assert response_mask(tokens, (9,)).long().tolist() == [[1, 1, 0, 0], [1, 1, 1, 0]]


def test_left_padded_responses_with_eos_valued_pads():
    # a ragged list left-padded with pad == EOS: the pads are not EOS, the real EOS at the end is
    tokens = torch.tensor([[2, 2, 5, 2], [4, 5, 6, 2]])
    generated = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    mask = response_mask(tokens, EOS, generated=generated)
    assert mask.long().tolist() == [[0, 0, 1, 1], [1, 1, 1, 1]]
    assert last_token_index(mask).tolist() == [3, 3]
    assert contains_eos(tokens, EOS, mask).tolist() == [True, True]


def test_matches_naive_loop():
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 6, (16, 9), generator=g)  # EOS ids 2 and 3 are frequent
    generated = torch.rand(16, 9, generator=g) > 0.2
    for eos in (2, [2, 3]):
        ids = [eos] if isinstance(eos, int) else eos
        assert torch.equal(response_mask(tokens, eos), naive_mask(tokens, ids))
        assert torch.equal(response_mask(tokens, eos, generated), naive_mask(tokens, ids, generated))
        mask = response_mask(tokens, eos)
        want_eos = [
            any(tok in ids for tok, m in zip(r, mr, strict=True) if m)
            for r, mr in zip(tokens.tolist(), mask.tolist(), strict=True)
        ]
        assert contains_eos(tokens, eos, mask).tolist() == want_eos
    want_last = [max([t for t in range(9) if generated[b, t]], default=-1) for b in range(16)]
    assert last_token_index(generated).tolist() == want_last


def test_padding_after_the_end_does_not_change_the_mask():
    tokens = torch.tensor([[5, 2], [5, 6]])
    mask = response_mask(tokens, EOS)
    padded = torch.cat([tokens, torch.full((2, 3), EOS)], 1)  # generate() pads with EOS-valued pad
    padded_mask = response_mask(padded, EOS)
    assert torch.equal(padded_mask[:, :2], mask)
    assert not padded_mask[0, 2:].any()  # row 0 ended: nothing after its EOS is real
    assert padded_mask[1, 2].item()  # row 1 had not ended: its next token (the EOS) is real
    assert last_token_index(padded_mask).tolist() == [1, 2]


def test_empty_row_has_last_index_minus_one():
    assert last_token_index(torch.zeros(2, 3, dtype=torch.bool)).tolist() == [-1, -1]


def test_position_ids_ignore_left_padding():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    assert position_ids_from_mask(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4], [0, 1, 2, 0, 0]]


def test_gather_last_reads_hidden_states_at_the_last_real_token():
    from salsa_lightning.rl.sequences import gather_last

    hidden = torch.arange(2 * 4 * 3, dtype=torch.float32).reshape(2, 4, 3)  # (B, T, H)
    mask = torch.tensor([[0, 1, 1, 0], [1, 1, 1, 1]])  # left and right padding
    torch.testing.assert_close(gather_last(hidden, mask), torch.stack([hidden[0, 2], hidden[1, 3]]))
    torch.testing.assert_close(gather_last(hidden[..., :1], mask), torch.stack([hidden[0, 2, 0], hidden[1, 3, 0]]))
