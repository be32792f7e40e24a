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


CHUNK_BYTES = 1 << 30     # largest message gather_in_order sends (MPI counts are 32-bit)
_GATHER_TAG = 7301        # its point-to-point messages (in order per sender: MPI does not overtake)


def gather_in_order(world, index: torch.Tensor | None, rows: torch.Tensor | None, dim: int,
                    n: int | None = None, chunk_bytes: int = CHUNK_BYTES) -> torch.Tensor | None:
    """Collective over ``world`` (a :class:`hpcattn.comm.base.Comm`; None: one process): rows of
    every rank to rank 0, in global token order.

    ``rows`` holds this rank's rows along ``dim`` (any shape, any dtype), ``index`` (len,) int64 their
    global token indices in that order; None/None where a rank holds no rows. Rank 0 gets one CPU
    tensor whose ``dim`` is sorted by global index (with ``n``: the indices must be exactly
    0..n-1, else RuntimeError), or None when no rank held rows; other ranks get None.

    Transport: the indices and shapes go through the control plane (``world.mpi.gather``, small);
    the rows go as raw bytes, host copies, point to point to rank 0 in messages of at most
    ``chunk_bytes`` (no pickling, no 2 GiB message limit: prompt logits (B, N, vocab) float32 are
    4 GB at N = 8K for a 128K vocabulary), received straight into rank 0's result.
    """
    mine = None if rows is None else rows.detach().cpu().contiguous()
    meta = None if mine is None else (index.cpu(), tuple(mine.shape), mine.dtype)
    metas = [meta] if world is None else world.mpi.gather(meta, root=0)
    if world is not None and world.rank != 0:
        if mine is not None:
            for part in _byte_chunks(mine, chunk_bytes):
                world.mpi.Send(part, dest=0, tag=_GATHER_TAG)
        return None
    present = [(r, m) for r, m in enumerate(metas) if m is not None]
    if not present:
        return None
    idx = torch.cat([m[0] for _, m in present])
    order = torch.argsort(idx)
    if n is not None and not torch.equal(idx[order], torch.arange(n)):
        _drain(world, present, chunk_bytes)
        raise RuntimeError(f"gather_in_order: the ranks' rows are not a permutation of 0..{n - 1}")
    shape, dtype = list(present[0][1][1]), present[0][1][2]
    shape[dim] = idx.numel()
    out = torch.empty(shape, dtype=dtype)
    rank_of = order.argsort()                  # global position of each gathered row
    at = 0
    for r, (ix, shp, _) in present:
        part = mine if r == 0 else _receive(world, r, shp, dtype, chunk_bytes)
        out.index_copy_(dim, rank_of[at:at + ix.numel()], part)
        at += ix.numel()
    return out


def _byte_chunks(t: torch.Tensor, chunk_bytes: int):
    """Numpy uint8 views of consecutive pieces (<= chunk_bytes) of contiguous t's bytes."""
    flat = t.view(-1).view(torch.uint8).numpy()
    for a in range(0, flat.size, chunk_bytes):
        yield flat[a:a + chunk_bytes]


def _receive(world, src: int, shape, dtype, chunk_bytes: int) -> torch.Tensor:
    """A tensor of ``shape``/``dtype`` from ``src``'s :func:`_byte_chunks` sends."""
    t = torch.empty(shape, dtype=dtype)
    for part in _byte_chunks(t, chunk_bytes):
        world.mpi.Recv(part, source=src, tag=_GATHER_TAG)
    return t


def _drain(world, present, chunk_bytes: int) -> None:
    """Receive (and drop) every other rank's rows, so no sender is left blocked before an error."""
    for r, (_, shp, dtype) in present:
        if r != 0:
            _receive(world, r, shp, dtype, chunk_bytes)
