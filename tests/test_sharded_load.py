"""The row arithmetic of reading weights straight into FSDP2 shards (soup.sharded). The loads themselves run in
2 processes in tests/test_fsdp.py, where they must reproduce the single-process runs."""

from __future__ import annotations

import pytest
import torch

from salsa_lightning.soup.sharded import local_rows, shard_rows


@pytest.mark.parametrize("n_rows", [1, 2, 5, 7, 8, 64, 49152])
@pytest.mark.parametrize("world", [1, 2, 3, 8])
def test_shard_rows_are_torch_chunk_padded_to_the_world(n_rows, world):
    chunks = list(torch.chunk(torch.arange(n_rows), world))
    chunks += [torch.arange(0)] * (world - len(chunks))  # FSDP2: ranks past the last chunk hold nothing
    covered = []
    for rank in range(world):
        start, stop = shard_rows(n_rows, world, rank)
        assert torch.equal(torch.arange(n_rows)[start:stop], chunks[rank])
        covered += range(start, stop)
    assert covered == list(range(n_rows))  # every row on exactly one rank, in order


def test_a_plain_tensor_is_all_rows():
    assert local_rows(torch.zeros(6, 3)) == (0, 6)
