"""Star Attention (spec star_attention.md), attention level.

Phase 1 - block-local context encoding, no communication: the context of n tokens is cut into
blocks of ``block`` tokens, distributed over ranks in contiguous groups (``tensor_split``); every
block except the first is prefixed with the anchor (the first ``anchor`` tokens of the context) and
attends causally within [anchor | block]. The anchor's KV is dropped afterwards: each rank's cache is
exactly its blocks' KV. Approximate.

Phase 2 - the query (ql rows after the context) and every decode step attend to all ranks' caches
and the states are merged exactly (all-gather of states, or the tree all-reduce). The last rank also
holds the query's own KV and attends to it causally. Default: other ranks attend their cache
non-causally (the intended math); ``compat_remote_causal_quirk`` reproduces the public code's
bottom-right causal mask on remote caches.
"""

from __future__ import annotations

import torch

from hpcattn.kernels import Kernel
from hpcattn.kernels.merge import merge_pair
from hpcattn.methods.tree import merge_over
from hpcattn.timing import NullTimer


def geometry(n: int, p: int, block: int | None = None, anchor: int | None = None) -> tuple[int, int]:
    """(block, anchor) of Star for a context of n tokens on p ranks: ``block`` tokens per block
    (default n // p), the context's first ``anchor`` tokens (default the whole block) as the anchor."""
    block = block or n // p
    return block, anchor if anchor is not None else block


def star_blocks(n: int, block: int, p: int) -> list[list[tuple[int, int]]]:
    """Per rank, the [start, stop) of the blocks it encodes (contiguous groups, sizes differ by <= 1)."""
    starts = list(range(0, n, block))
    m = len(starts)
    out = []
    for r in range(p):
        a, b = r * m // p, (r + 1) * m // p
        out.append([(starts[i], min(n, starts[i] + block)) for i in range(a, b)])
    return out


def star_phase1_block(q, k, v, anchor_q, anchor_k, anchor_v, *, kernel: Kernel, scale: float, first: bool):
    """One block's phase-1 attention: [anchor | block] causal, output of the block rows only.

    q, k, v: (B, b, H, d) block; anchor_*: (B, la, H, d). Returns (out (B, b, Hq, d), lse (B, Hq, b)).
    The block rows see all anchor keys (non-causal) and the block causally: two stock calls, merged.
    """
    if first or anchor_k.shape[1] == 0:
        return kernel(q, k, v, scale=scale, causal="square")
    o1, l1 = kernel(q, anchor_k, anchor_v, scale=scale, causal="none")
    o2, l2 = kernel(q, k, v, scale=scale, causal="square")
    o, l = merge_pair(o1, l1, o2, l2)
    return o.to(q.dtype), l


def star_phase1(q, k, v, *, blocks: list[tuple[int, int]], anchor: int, kernel: Kernel, scale: float,
                tm=NullTimer()):
    """Phase 1 on this rank, no communication.

    q, k, v: (B, n, H, d) views of the whole context (a rank reads only its blocks and the anchor).
    Returns (out, lse) of this rank's block rows, concatenated in order: (B, t, Hq, d), (B, Hq, t).
    """
    outs, lses = [], []
    a_q, a_k, a_v = q[:, :anchor], k[:, :anchor], v[:, :anchor]
    with tm("compute"):
        for s0, s1 in blocks:
            o, l = star_phase1_block(q[:, s0:s1], k[:, s0:s1], v[:, s0:s1], a_q, a_k, a_v, kernel=kernel,
                                     scale=scale, first=(s0 == 0))
            outs.append(o)
            lses.append(l)
    if not outs:
        B, _, H, d = q.shape
        return q.new_zeros(B, 0, H, d), torch.zeros(B, H, 0, device=q.device)
    return torch.cat(outs, 1), torch.cat(lses, 2)


def star_query(qq, kq, vq, k_cache, v_cache, ctx, *, kernel: Kernel, scale: float, is_last: bool,
               reduction: str = "allgather", quirk: bool = False, tm=NullTimer()):
    """Phase 2: exact attention of the query rows over every rank's cache (+ causal over the query).

    qq: (B, ql, Hq, d) on every rank; kq, vq: (B, ql, Hkv, d) the query's own KV (used by the last
    rank, which holds it); k_cache, v_cache: (B, t, Hkv, d) this rank's cache.
    Returns (out (B, ql, Hq, d) qq.dtype, lse (B, Hq, ql)), identical on every rank.
    """
    with tm("compute"):
        if is_last:
            k = torch.cat([k_cache, kq], 1)
            v = torch.cat([v_cache, vq], 1)
            o, l = kernel(qq, k, v, scale=scale, causal="bottom_right")
        else:
            o, l = kernel(qq, k_cache, v_cache, scale=scale, causal="bottom_right" if quirk else "none")
    out, lse = merge_over(ctx.world, o, l, reduction=reduction, tm=tm)
    return out.to(qq.dtype), lse
