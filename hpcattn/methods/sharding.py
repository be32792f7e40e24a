"""Token layouts over ranks.

* contiguous: rank r holds tokens [r*N//p, (r+1)*N//p) - ragged when p does not divide N, and a
  rank holds 0 tokens when N < p;
* zigzag: the sequence is cut into 2p chunks and rank r holds chunks r and 2p-1-r (N % 2p == 0),
  which balances causal work (spec ring_attention.md section 3.1).

:func:`gather_in_order` is the way back: every rank's rows to rank 0, in global token order.
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


def gather_in_order(world, index: torch.Tensor | None, rows: torch.Tensor | None, dim: int,
                    n: int | None = None) -> torch.Tensor | None:
    """Collective over ``world`` (a :class:`hpcattn.comm.base.Comm`; None: one process): rows of
    every rank to rank 0, in global token order.

    ``rows`` holds this rank's rows along ``dim`` (any shape), ``index`` (len,) int64 their global
    token indices in that order; None/None where a rank holds no rows. Sent as host copies through
    the control plane (``world.mpi.gather``). Rank 0 gets one CPU tensor whose ``dim`` is sorted by
    global index (with ``n``: the indices must be exactly 0..n-1, else RuntimeError), or None when
    no rank held rows; other ranks get None.
    """
    mine = None if rows is None else (index.cpu(), rows.cpu())
    parts = [mine] if world is None else world.mpi.gather(mine, root=0)
    if world is not None and world.rank != 0:
        return None
    parts = [pp for pp in parts if pp is not None]
    if not parts:
        return None
    idx = torch.cat([pp[0] for pp in parts])
    order = torch.argsort(idx)
    if n is not None and not torch.equal(idx[order], torch.arange(n)):
        raise RuntimeError(f"gather_in_order: the ranks' rows are not a permutation of 0..{n - 1}")
    return torch.cat([pp[1] for pp in parts], dim=dim).index_select(dim, order)
