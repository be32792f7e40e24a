"""Tree attention decode (spec tree_attention.md): KV sharded over ranks, one collective merge.

Every rank holds the same query and a contiguous shard of the KV cache (ragged; possibly empty).
Each rank computes the attention state of its shard with the local kernel, then the states are
merged exactly over the ranks by one of two protocols:

* ``allreduce``: ``Allreduce(MAX)`` of lse (B*Hq*Sq floats), then ``Allreduce(SUM)`` of the packed
  fp32 buffer ``[w*out | w]`` with ``w = exp(lse - max)`` (B*Hq*Sq*(d+1) floats) - 2 collectives;
* ``allgather``: one ``Allgather`` of the packed ``[out | lse]`` and a local merge - 1 collective,
  p times the bytes.

``topology=hierarchical`` merges inside each node first (to the node leader), then among the
node leaders, then broadcasts inside the node; the node state is itself an attention state, so the
result is exact. Layouts are explicit everywhere (the public code's batch>1 broadcast bug cannot
happen: states are packed in (B, H, Sq) row order).
"""

from __future__ import annotations

import torch

from hpcattn import graph
from hpcattn.comm import CommContext
from hpcattn.comm.base import Comm
from hpcattn.kernels import Kernel
from hpcattn.kernels.merge import (acc_dtype, merge_states, normalize_sum, pack_states, safe_max,
                                   unpack_states)
from hpcattn.timing import NullTimer

# a CUDA graph captures the whole step, the merge's collective included (NCCL)
CUDA_GRAPHS = graph.declare("tree", graph.Capture())


def merge_over(comm: Comm, out: torch.Tensor, lse: torch.Tensor, *, reduction: str, tm=NullTimer(),
               root: int | None = None, fused: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact merge of the ranks' states over ``comm``.

    out (B, Sq, H, d), lse (B, H, Sq) -> merged (out fp32, lse fp32), valid on every rank, or only
    on ``root`` when ``root`` is given and ``reduction == "allreduce"`` (a Reduce replaces the SUM).
    ``fused``: merge the all-gathered states with one Triton kernel (GPU; float32 inputs to it).
    """
    B, Sq, H, d = out.shape
    acc = acc_dtype(out, lse)
    if comm.size == 1:
        return out.to(acc), lse.to(acc)
    if reduction == "allgather":
        with tm("merge"):
            buf = pack_states(out, lse)                              # (B*H*Sq, d+1) fp32
        with tm("comm"):
            gathered = comm.allgather(buf)                           # (p, B*H*Sq, d+1)
        with tm("merge"):
            if fused and gathered.dtype == torch.float32:
                from hpcattn.kernels.merge_triton import available, merge_gathered
                if available(gathered):
                    o, l = merge_gathered(gathered, torch.float32)  # rows in (B, H, Sq) order
                    return o.view(B, H, Sq, d).transpose(1, 2), l.view(B, H, Sq)
            outs, lses = unpack_states(gathered, B, Sq, H, d)
            return merge_states(outs, lses)
    if reduction != "allreduce":
        raise ValueError(f"reduction must be allreduce or allgather, got {reduction!r}")
    with tm("comm"):
        m = comm.allreduce(lse.to(acc).contiguous().clone(), "max")  # collective 1: B*H*Sq fp32
    with tm("merge"):
        m_safe = safe_max(m)
        w = torch.exp(lse.to(acc) - m_safe)                          # 0 for empty shards
        buf = pack_states(out, lse, weight=w)                        # [w*out | w]
    with tm("comm"):
        if root is None:
            comm.allreduce(buf, "sum")                               # collective 2
        else:
            comm.reduce(buf, "sum", root=root)
    with tm("merge"):
        return normalize_sum(buf, m_safe, B, Sq, H, d)


def tree_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: CommContext, *, kernel: Kernel,
                scale: float, k_lengths: list[int] | None = None, reduction: str = "allgather",
                topology: str = "flat", fused_merge: bool = False,
                tm=NullTimer()) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact decode attention over a KV cache sharded across ``ctx.world``.

    Args:
        q: (B, Sq, Hq, d), identical on every rank (Sq = 1 for decode).
        k, v: (B, t_r, Hkv, d), this rank's contiguous shard (t_r may be 0).
        k_lengths: per-sequence valid tokens of this shard (ragged batch), each <= t_r.
        reduction: ``allreduce`` | ``allgather``; topology: ``flat`` | ``hierarchical``.
        fused_merge: with ``allgather`` (flat), merge in one Triton kernel on GPUs.
    Returns:
        out (B, Sq, Hq, d) in q.dtype and lse (B, Hq, Sq) fp32 (fp64 for fp64 inputs), identical
        on every rank.
    """
    if topology not in ("flat", "hierarchical"):
        raise ValueError(f"topology must be flat or hierarchical, got {topology!r}")
    with tm("compute"):
        o, lse = kernel(q, k, v, scale=scale, causal="none", k_lengths=k_lengths)
    if ctx.world.size == 1:       # the local state is the answer: no merge, no dtype round trip
        return o, lse.to(acc_dtype(q, lse))
    if topology == "flat":
        out, lse = merge_over(ctx.world, o, lse, reduction=reduction, tm=tm, fused=fused_merge)
    else:
        out, lse = merge_over(ctx.node, o, lse, reduction=reduction, tm=tm, root=0)
        if ctx.leaders is not None and ctx.leaders.size > 1:
            out, lse = merge_over(ctx.leaders, out, lse, reduction=reduction, tm=tm)
        if ctx.node.size > 1:
            B, Sq, H, d = o.shape
            with tm("merge"):
                buf = pack_states(out, lse)
            with tm("comm"):
                ctx.node.broadcast(buf, root=0)
            with tm("merge"):
                out, lse = unpack_states(buf, B, Sq, H, d)
    return out.to(q.dtype), lse.to(acc_dtype(q, lse))
