"""Token layouts over ranks and rank-count-independent synthetic inputs."""

from __future__ import annotations

import pytest
import torch

from hpcattn.jobs.inputs import CHUNK, synth_range, synth_tokens
from hpcattn.methods.sharding import (contiguous_bounds, layout_indices, shard_lengths,
                                      zigzag_indices)

# ------------------------------------------------------------------------------------------------
# contiguous


@pytest.mark.parametrize("n,p", [(0, 1), (0, 3), (1, 1), (1, 4), (3, 5), (7, 3), (10, 4), (12, 4),
                                 (100, 7), (4097, 8)])
def test_contiguous_bounds_cover_exactly(n, p):
    bounds = [contiguous_bounds(n, p, r) for r in range(p)]
    assert bounds[0][0] == 0 and bounds[-1][1] == n
    for (a, b), (c, _) in zip(bounds, bounds[1:]):
        assert b == c                                   # adjacent, no gap, no overlap
    sizes = [b - a for a, b in bounds]
    assert all(s >= 0 for s in sizes) and sum(sizes) == n
    assert max(sizes) - min(sizes) <= 1                 # balanced (ragged by at most one)
    covered = torch.cat([layout_indices("contiguous", n, p, r) for r in range(p)])
    assert torch.equal(covered, torch.arange(n))


def test_contiguous_ragged_and_empty_shards():
    assert [contiguous_bounds(10, 4, r) for r in range(4)] == [(0, 2), (2, 5), (5, 7), (7, 10)]
    sizes = [b - a for a, b in (contiguous_bounds(3, 5, r) for r in range(5))]
    assert sizes.count(0) == 2 and sizes.count(1) == 3   # n < p: some ranks hold nothing
    assert layout_indices("contiguous", 3, 5, 0).numel() == 0


def test_shard_lengths_ragged_batch():
    lengths = [10, 0, 3, 7]
    p = 4
    per_rank = [shard_lengths(lengths, p, r) for r in range(p)]
    for b, n in enumerate(lengths):
        assert sum(per_rank[r][b] for r in range(p)) == n
    assert all(per_rank[r][1] == 0 for r in range(p))


# ------------------------------------------------------------------------------------------------
# zigzag


@pytest.mark.parametrize("n,p", [(2, 1), (8, 1), (8, 2), (12, 3), (16, 4), (80, 5), (64, 8)])
def test_zigzag_union_is_permutation(n, p):
    parts = [zigzag_indices(n, p, r) for r in range(p)]
    allidx = torch.cat(parts)
    assert allidx.dtype == torch.int64
    assert torch.equal(allidx.sort().values, torch.arange(n))     # a permutation of range(n)
    c = n // (2 * p)
    for r, idx in enumerate(parts):
        assert idx.numel() == 2 * c                               # equal shard sizes
        expect = list(range(r * c, (r + 1) * c)) + list(range((2 * p - 1 - r) * c, (2 * p - r) * c))
        assert idx.tolist() == expect                             # chunk r, then chunk 2p-1-r
        assert torch.equal(layout_indices("zigzag", n, p, r), idx)


def test_zigzag_balances_causal_work():
    """Each rank's causal work sum(i+1 over its tokens) is identical under zigzag."""
    n, p = 64, 4
    work = [int((zigzag_indices(n, p, r) + 1).sum()) for r in range(p)]
    assert len(set(work)) == 1
    contiguous = [int((layout_indices("contiguous", n, p, r) + 1).sum()) for r in range(p)]
    assert len(set(contiguous)) == p                              # contiguous is unbalanced


@pytest.mark.parametrize("n,p", [(7, 1), (10, 4), (12, 5), (4, 4), (6, 2)])
def test_zigzag_requires_divisibility(n, p):
    with pytest.raises(ValueError, match="divisible by 2p"):
        zigzag_indices(n, p, 0)


# ------------------------------------------------------------------------------------------------
# synthetic inputs


def synth(idx, seed=0, name="k", dtype=torch.float32, batch=2, heads=3, dim=4):
    return synth_tokens(name, seed, batch, heads, dim, idx, dtype=dtype, device=torch.device("cpu"))


def test_synth_subset_equals_rows_of_full():
    n = CHUNK + 300                                  # spans two generator chunks
    full = synth(torch.arange(n))
    assert full.shape == (2, n, 3, 4)
    for idx in (torch.tensor([0, 5, CHUNK - 1, CHUNK, CHUNK + 299]),
                torch.tensor([CHUNK + 10, 3, 7]),        # unsorted
                torch.arange(100, 200),
                torch.tensor([42])):
        assert torch.equal(synth(idx), full[:, idx])


@pytest.mark.parametrize("p", [1, 2, 3, 8])
def test_synth_independent_of_rank_count(p):
    n = 4800                              # divisible by 2p for every p here; spans 2 chunks
    full = synth(torch.arange(n), name="q")
    for layout in ("contiguous", "zigzag"):
        pieces = [(layout_indices(layout, n, p, r), synth(layout_indices(layout, n, p, r), name="q"))
                  for r in range(p)]
        rebuilt = torch.empty_like(full)
        for idx, t in pieces:
            rebuilt[:, idx] = t
        assert torch.equal(rebuilt, full)


def test_synth_range_matches_tokens():
    a = synth_range("v", 3, 2, 3, 4, 10, 50, dtype=torch.float32, device=torch.device("cpu"))
    assert torch.equal(a, synth(torch.arange(10, 50), seed=3, name="v"))
    empty = synth_range("v", 3, 2, 3, 4, 5, 5, dtype=torch.float32, device=torch.device("cpu"))
    assert empty.shape == (2, 0, 3, 4)


def test_synth_deterministic_and_seed_dependent():
    idx = torch.arange(0, 300, 7)
    a, b = synth(idx, seed=11), synth(idx, seed=11)
    assert torch.equal(a, b)
    c = synth(idx, seed=12)
    assert not torch.equal(a, c)
    assert (a != c).float().mean() > 0.99           # essentially every value differs
    # the tensor name is part of the seed: q, k, v are different streams
    assert not torch.equal(synth(idx, name="q"), synth(idx, name="k"))
    # standard normal values
    big = synth(torch.arange(2000), seed=1, batch=1, heads=2, dim=8)
    assert abs(big.mean().item()) < 0.05 and abs(big.std().item() - 1) < 0.05


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_synth_dtype_is_cast_of_float32_stream(dtype):
    idx = torch.arange(33)
    assert synth(idx, dtype=dtype).dtype == dtype
    assert torch.equal(synth(idx, dtype=dtype), synth(idx).to(dtype))
