"""Token layouts over ranks.

* contiguous: rank r holds tokens [r*N//p, (r+1)*N//p) - ragged when p does not divide N, and a
  rank holds 0 tokens when N < p;
* zigzag: the sequence is cut into 2p chunks and rank r holds chunks r and 2p-1-r (N % 2p == 0),
  which balances causal work (spec ring_attention.md section 3.1).
"""

from __future__ import annotations

import torch


def contiguous_bounds(n: int, p: int, r: int) -> tuple[int, int]:
    """[start, stop) of rank r's contiguous shard of n tokens over p ranks."""
    return r * n // p, (r + 1) * n // p


def shard_lengths(lengths: list[int], p: int, r: int) -> list[int]:
    """Per-sequence token counts of rank r for a ragged batch split contiguously."""
    return [contiguous_bounds(n, p, r)[1] - contiguous_bounds(n, p, r)[0] for n in lengths]


def zigzag_indices(n: int, p: int, r: int) -> torch.Tensor:
    """Global token indices held by rank r under zigzag (chunk r, then chunk 2p-1-r)."""
    if n % (2 * p):
        raise ValueError(f"zigzag needs n divisible by 2p: n={n}, p={p}")
    c = n // (2 * p)
    return torch.cat([torch.arange(r * c, (r + 1) * c), torch.arange((2 * p - 1 - r) * c, (2 * p - r) * c)])


def layout_indices(layout: str, n: int, p: int, r: int) -> torch.Tensor:
    """Global token indices of rank r's shard for ``contiguous`` or ``zigzag``."""
    if layout == "zigzag":
        return zigzag_indices(n, p, r)
    a, b = contiguous_bounds(n, p, r)
    return torch.arange(a, b)
