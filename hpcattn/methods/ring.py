"""Ring attention (spec ring_attention.md): prefill over sequence-sharded q, k, v, and the
KV-rotating ring decode that tree decode is measured against.

Prefill: over p steps the packed ``[K | V]`` block of every rank travels once around the ring;
the transfer of the next block is posted before the current block's attention is launched, so it
overlaps compute. Partial states are folded into an fp32 accumulator with the guarded pairwise
merge. Layouts:

* ``contiguous`` - causal steps with a source after this rank are skipped (unbalanced);
* ``zigzag`` - rank r holds chunks r and 2p-1-r; after step 0 every rank does half a block per
  step: the whole local q against the source's early chunk (source before this rank), or the
  local late chunk against the whole block (source after this rank).

Only Hkv heads travel (GQA stays compressed on the wire).
"""

from __future__ import annotations

import torch

from hpcattn import graph
from hpcattn.comm import CommContext
from hpcattn.kernels import Kernel
from hpcattn.kernels.merge import merge_pair
from hpcattn.methods.sharding import contiguous_bounds
from hpcattn.timing import NullTimer

# the decode's point-to-point KV rotation stays eager (hpcattn.graph.Capture)
CUDA_GRAPHS = graph.declare("ring", graph.Capture(eager="ring decode (point-to-point KV rotation) runs eagerly"))


def kv_buffer(k: torch.Tensor, tmax: int) -> torch.Tensor:
    """Contiguous head-major [K | V] buffer (2, B, Hkv, tmax, d): the wire format, and what the
    kernel reads without a copy through :func:`_kv_views`."""
    B, _, Hkv, d = k.shape
    return torch.empty(2, B, Hkv, tmax, d, dtype=k.dtype, device=k.device)


def _kv_views(buf: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first n tokens of a [K | V] buffer as (B, n, Hkv, d) views."""
    return buf[0, :, :, :n].transpose(1, 2), buf[1, :, :, :n].transpose(1, 2)


def fill_kv(buf: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Write k, v (B, n, Hkv, d) into the first n token slots of a :func:`kv_buffer`."""
    n = k.shape[1]
    buf[0, :, :, :n] = k.transpose(1, 2)
    buf[1, :, :, :n] = v.transpose(1, 2)


def _fold(acc_o, acc_l, o, l, rows: slice | None = None):
    """Merge block state (o, l) into the accumulator, in place, for query rows ``rows``."""
    if rows is None:
        acc_o[:], acc_l[:] = merge_pair(acc_o, acc_l, o, l)
    else:
        acc_o[:, rows], acc_l[:, :, rows] = merge_pair(acc_o[:, rows], acc_l[:, :, rows], o, l)


def ring_prefill(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: CommContext, *, kernel: Kernel,
                 scale: float, causal: bool = True, layout: str = "zigzag",
                 tm=NullTimer()) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact attention of this rank's query rows over the whole sequence.

    Args:
        q: (B, t, Hq, d); k, v: (B, t, Hkv, d) - this rank's shard in ``layout`` (equal t on all
            ranks for zigzag; contiguous shards may be ragged).
    Returns:
        out (B, t, Hq, d) in q.dtype, lse (B, Hq, t) fp32, in the shard's token order.
    """
    comm = ctx.world
    p, r = comm.size, comm.rank
    B, t, Hq, d = q.shape
    Hkv = k.shape[2]
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    acc_o = torch.zeros(B, t, Hq, d, dtype=acc, device=q.device)
    acc_l = torch.full((B, Hq, t), float("-inf"), dtype=acc, device=q.device)
    sizes = [t] * p
    if layout == "contiguous":
        n = comm.mpi.allreduce(t)
        sizes = [b - a for a, b in (contiguous_bounds(n, p, i) for i in range(p))]
    tmax = max(sizes)
    cur = kv_buffer(k, tmax)
    fill_kv(cur, k, v)
    nxt = kv_buffer(k, tmax) if p > 1 else None
    half = t // 2
    for step in range(p):
        req = None
        if step + 1 < p:
            with tm("comm"):
                req = comm.sendrecv_start(cur, (r + 1) % p, nxt, (r - 1) % p)
        src = (r - step) % p
        ts = sizes[src]
        kb, vb = _kv_views(cur, ts)
        with tm("compute"):
            if not causal:
                o, l = kernel(q, kb, vb, scale=scale, causal="none")
                _fold(acc_o, acc_l, o, l)
            elif layout == "zigzag":
                if step == 0:
                    o, l = kernel(q, kb, vb, scale=scale, causal="square")
                    _fold(acc_o, acc_l, o, l)
                elif src < r:
                    o, l = kernel(q, kb[:, :half], vb[:, :half], scale=scale, causal="none")
                    _fold(acc_o, acc_l, o, l)
                else:
                    o, l = kernel(q[:, half:], kb, vb, scale=scale, causal="none")
                    _fold(acc_o, acc_l, o, l, slice(half, t))
            elif layout == "contiguous":
                if src == r:
                    o, l = kernel(q, kb, vb, scale=scale, causal="square")
                    _fold(acc_o, acc_l, o, l)
                elif src < r:
                    o, l = kernel(q, kb, vb, scale=scale, causal="none")
                    _fold(acc_o, acc_l, o, l)
            else:
                raise ValueError(f"layout must be zigzag or contiguous, got {layout!r}")
        if req is not None:
            with tm("comm"):
                req.wait()
            cur, nxt = nxt, cur
    return acc_o.to(q.dtype), acc_l


def ring_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: CommContext, *, kernel: Kernel,
                scale: float, shard_lengths: list[list[int]], tm=NullTimer()) -> tuple[torch.Tensor, torch.Tensor]:
    """KV-rotating ring decode (the baseline of the Tree Attention paper): every KV shard visits
    every rank, which attends its replicated query to it and folds the state.

    Args:
        q: (B, Sq, Hq, d), identical on every rank.
        k, v: (B, t_r, Hkv, d), this rank's shard.
        shard_lengths: ``shard_lengths[i][b]`` = valid tokens of sequence b on rank i (all ranks).
    Returns:
        out (B, Sq, Hq, d) q.dtype, lse (B, Hq, Sq) fp32, identical on every rank.
    """
    comm = ctx.world
    p, r = comm.size, comm.rank
    B, Sq, Hq, d = q.shape
    Hkv = k.shape[2]
    tmax = max(max(ls) if ls else 0 for ls in shard_lengths)
    cur = kv_buffer(k, tmax).zero_()
    fill_kv(cur, k, v)
    nxt = kv_buffer(k, tmax) if p > 1 else None
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    acc_o = torch.zeros(B, Sq, Hq, d, dtype=acc, device=q.device)
    acc_l = torch.full((B, Hq, Sq), float("-inf"), dtype=acc, device=q.device)
    for step in range(p):
        req = None
        if step + 1 < p:
            with tm("comm"):
                req = comm.sendrecv_start(cur, (r + 1) % p, nxt, (r - 1) % p)
        lens = shard_lengths[(r - step) % p]
        width = max(lens) if lens else 0
        with tm("compute"):
            kb, vb = _kv_views(cur, width)
            o, l = kernel(q, kb, vb, scale=scale, causal="none", k_lengths=lens)
            acc_o, acc_l = merge_pair(acc_o, acc_l, o, l)
        if req is not None:
            with tm("comm"):
                req.wait()
            cur, nxt = nxt, cur
    return acc_o.to(q.dtype), acc_l
