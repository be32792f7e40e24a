"""The attention-level prefill job: causal (or full) attention of a sequence of ``shape.context``
tokens, sharded over ranks in the ring layout (zigzag or contiguous).

Methods: ``local`` (rank 0 computes the whole sequence: the single-device baseline) and ``ring``.
The check compares ``run.check_rows`` evenly spaced query rows (gathered from the ranks that own
them) with a float64 reference computed on rank 0.
"""

from __future__ import annotations

import torch

from hpcattn.jobs.check import max_err, reference_state
from hpcattn.jobs.inputs import DTYPES, InputSource
from hpcattn.methods import local_attention, ring_prefill
from hpcattn.methods.sharding import layout_indices


def check_rows(n: int, count: int) -> torch.Tensor:
    """``count`` evenly spaced global row indices in [0, n), always including the first and last."""
    if count >= n:
        return torch.arange(n)
    return torch.unique(torch.linspace(0, n - 1, count).round().long())


class PrefillJob:
    """Inputs and method calls of one prefill sweep point on this rank."""

    def __init__(self, cfg, ctx, kernel):
        self.cfg, self.ctx, self.kernel = cfg, ctx, kernel
        s = cfg.shape
        self.p, self.r = ctx.size, ctx.rank
        self.n = s.context
        self.scale = s.scale if s.scale is not None else s.head_dim ** -0.5
        self.causal = s.causal
        layout = cfg.ring.layout if self.p > 1 else "contiguous"
        self.layout = layout
        self.index = layout_indices(layout, self.n, self.p, self.r)
        src = InputSource(cfg, ctx.device)
        self.q, self.k, self.v = (src.tokens(x, self.index) for x in ("q", "k", "v"))
        self.full = None
        if self.r == 0 and ("local" in cfg.methods or cfg.run.check):
            self.full = tuple(src.range(x, 0, self.n) for x in ("q", "k", "v"))
        self.rows = check_rows(self.n, cfg.run.check_rows)

    def method(self, case):
        kern, sc = self.kernel, self.scale
        causal = "square" if self.causal else "none"
        if case.method == "local":
            if self.r != 0:
                return lambda tm: None
            q, k, v = self.full
            return lambda tm: local_attention(q, k, v, kernel=kern, scale=sc, causal=causal, tm=tm)
        if case.method == "ring":
            return lambda tm: ring_prefill(self.q, self.k, self.v, self.ctx, kernel=kern, scale=sc,
                                           causal=self.causal, layout=self.layout, tm=tm)
        raise ValueError(case.method)

    def _owned(self, case, result):
        """(global indices, out, lse) of the rows this rank computed for ``case``."""
        if result is None:
            return None
        out, lse = result
        index = torch.arange(self.n) if case.method == "local" else self.index
        return index, out, lse

    # -- correctness -----------------------------------------------------------------------------
    def reference(self) -> dict | None:
        if self.r != 0 or not self.cfg.run.check:
            return None
        q, k, v = self.full
        rows = self.rows.to(q.device)
        ro, rl = reference_state(q[:, rows], k, v, scale=self.scale, q_pos=rows if self.causal else None)
        bo, bl = self.kernel(q, k, v, scale=self.scale, causal="square" if self.causal else "none")
        return {"out": ro, "lse": rl, "base_err_out": max_err(bo[:, rows], ro),
                "base_err_lse": max_err(bl[:, :, rows], rl)}

    def errors(self, case, result, ref) -> dict | None:
        """Gather the checked rows to rank 0 and compare (collective)."""
        if not self.cfg.run.check:
            return None
        mine = None
        owned = self._owned(case, result)
        if owned is not None:
            index, out, lse = owned
            sel = torch.isin(index, self.rows).nonzero().flatten()
            sel_d = sel.to(out.device)
            mine = (index[sel], out[:, sel_d].float().cpu(), lse[:, :, sel_d].float().cpu())
        parts = self.ctx.world.mpi.gather(mine, root=0)
        if self.r != 0:
            return None
        idx = torch.cat([pp[0] for pp in parts if pp is not None])
        out = torch.cat([pp[1] for pp in parts if pp is not None], dim=1)
        lse = torch.cat([pp[2] for pp in parts if pp is not None], dim=2)
        order = torch.argsort(idx)
        if not torch.equal(idx[order], self.rows):
            raise RuntimeError(f"{case.method}: gathered rows do not cover the checked rows")
        return {"err_out": max_err(out[:, order], ref["out"].cpu()),
                "err_lse": max_err(lse[:, :, order], ref["lse"].cpu()),
                "base_err_out": ref["base_err_out"], "base_err_lse": ref["base_err_lse"]}

    def gathered_outputs(self, case, result):
        """All rows gathered to rank 0 in global order (collective): dict of float32 numpy, or None."""
        owned = self._owned(case, result)
        mine = None if owned is None else (owned[0], owned[1].float().cpu(), owned[2].float().cpu())
        parts = self.ctx.world.mpi.gather(mine, root=0)
        if self.r != 0:
            return None
        parts = [pp for pp in parts if pp is not None]
        idx = torch.cat([pp[0] for pp in parts])
        order = torch.argsort(idx)
        out = torch.cat([pp[1] for pp in parts], dim=1)[:, order]
        lse = torch.cat([pp[2] for pp in parts], dim=2)[:, :, order]
        return {"out": out.numpy(), "lse": lse.numpy()}


def estimate(cfg, method: str, p: int) -> tuple[int, int]:
    """(peak bytes of tensors on the busiest rank, payload bytes per rank per step) - a plan."""
    s = cfg.shape
    e = torch.empty(0, dtype=DTYPES[s.dtype]).element_size()
    qkv = lambda n: s.batch * n * (s.heads_q + 2 * s.heads_kv) * s.head_dim * e  # noqa: E731
    acc = lambda n: s.batch * n * s.heads_q * (s.head_dim + 1) * 4  # noqa: E731
    if method == "local":
        return qkv(s.context) + acc(s.context), 0
    t = -(-s.context // p)
    kvblock = 2 * s.batch * t * s.heads_kv * s.head_dim * e
    if method == "ring":
        return qkv(t) + 2 * kvblock + acc(t), (p - 1) * kvblock
    raise ValueError(method)
