"""The attention-level decode job: one decode step over a KV cache of ``shape.context`` tokens.

Every rank holds the same query (B, Sq, Hq, d) (Sq = 1 unless an input file gives more rows) and
a contiguous shard of every sequence's KV (ragged lengths allowed; a rank may hold no token).
Methods: ``local`` (rank 0 holds the whole cache: the single-device baseline), ``tree`` and
``ring`` (KV-rotating ring decode). Outputs are replicated, so every rank's copy is checked.
"""

from __future__ import annotations

import torch

from hpcattn import graph
from hpcattn.dtypes import DTYPES
from hpcattn.jobs.check import count_nonfinite, max_err, reference_state, reference_state_bytes
from hpcattn.jobs.inputs import InputSource, file_shape
from hpcattn.methods import local_attention, ring_decode, tree_decode
from hpcattn.methods.sharding import contiguous_bounds, shard_lengths
from hpcattn.timing import NullTimer


class DecodeJob:
    """Inputs and method calls of one decode sweep point on this rank."""

    def __init__(self, cfg, ctx, kernel):
        self.cfg, self.ctx, self.kernel = cfg, ctx, kernel
        s = cfg.shape
        self.p, self.r = ctx.size, ctx.rank
        self.scale = s.scale if s.scale is not None else s.head_dim ** -0.5
        self.lengths = list(s.lengths) if s.lengths is not None else [s.context] * s.batch
        self.all_shards = [shard_lengths(self.lengths, self.p, i) for i in range(self.p)]
        self.my_lengths = self.all_shards[self.r]
        src = InputSource(cfg, ctx.device)
        q_rows = 1
        if cfg.inputs.source == "file":
            q_rows = file_shape(cfg.inputs.path)["q_len"]
        self.q = src.range("q", 0, q_rows)
        self.k, self.v = self._shard(src)
        self.graph_modes: dict[str, dict] = {}
        self.need_full = self.r == 0 and ("local" in cfg.methods or cfg.run.check)
        self.k_full = self.v_full = None
        if self.need_full:
            self.k_full, self.v_full = src.range("k", 0, s.context), src.range("v", 0, s.context)

    def _shard(self, src: InputSource):
        s = self.cfg.shape
        bounds = [contiguous_bounds(n, self.p, self.r) for n in self.lengths]
        if len(set(bounds)) == 1:
            a, b = bounds[0]
            return src.range("k", a, b), src.range("v", a, b)
        width = max(b - a for a, b in bounds)
        k = torch.zeros(s.batch, s.heads_kv, width, s.head_dim, dtype=DTYPES[s.dtype],
                        device=self.ctx.device).transpose(1, 2)          # head-major storage
        v = torch.zeros_like(k)
        for i, (a, b) in enumerate(bounds):
            k[i, : b - a] = src.range("k", a, b)[i]
            v[i, : b - a] = src.range("v", a, b)[i]
        return k, v

    def method(self, case):
        """A callable ``fn(tm) -> (out, lse) or None`` running one step of ``case.method``: the
        step captured once as a CUDA graph and replayed (``run.cuda_graphs``, see
        :mod:`hpcattn.graph`; phases are then not split), or the eager calls."""
        fn = self._eager(case)
        use, why = graph.decide(case.cfg.run.cuda_graphs, graph.blocker(
            device=self.ctx.device.type, method=case.method, backend=self.ctx.backend, world_size=self.p))
        self.graph_modes[case.id] = {"cuda_graphs": "graph" if use else "eager", "cuda_graphs_reason": why}
        if not use or (case.method == "local" and self.r != 0):
            return fn
        step = graph.StepGraph(lambda: fn(NullTimer()), counters=self.ctx.counters)
        return lambda tm: step()

    def graph_attrs(self, case) -> dict:
        """Record attributes: which mode ran (``graph`` | ``eager``) and why."""
        return self.graph_modes.get(case.id, {})

    def _eager(self, case):
        c, kern, sc = case.cfg, self.kernel, self.scale
        ragged = self.cfg.shape.lengths is not None
        if case.method == "local":
            if self.r != 0:
                return lambda tm: None
            lens = self.lengths if ragged else None
            return lambda tm: local_attention(self.q, self.k_full, self.v_full, kernel=kern, scale=sc,
                                              k_lengths=lens, tm=tm)
        if case.method == "tree":
            lens = self.my_lengths if ragged else None
            return lambda tm: tree_decode(self.q, self.k, self.v, self.ctx, kernel=kern, scale=sc,
                                          k_lengths=lens, reduction=c.tree.reduction,
                                          topology=c.tree.topology, fused_merge=c.tree.fused_merge, tm=tm)
        if case.method == "ring":
            return lambda tm: ring_decode(self.q, self.k, self.v, self.ctx, kernel=kern, scale=sc,
                                          shard_lengths=self.all_shards, tm=tm)
        raise ValueError(case.method)

    # -- correctness -----------------------------------------------------------------------------
    def reference(self) -> dict | None:
        """On rank 0: float64 reference and the same-dtype baseline's errors (None elsewhere)."""
        if self.r != 0 or not self.cfg.run.check:
            return None
        ro, rl = reference_state(self.q, self.k_full, self.v_full, scale=self.scale,
                                 k_lengths=self.lengths)
        bo, bl = self.kernel(self.q, self.k_full, self.v_full, scale=self.scale, k_lengths=self.lengths)
        return {"out": ro, "lse": rl, "base_err_out": max_err(bo, ro), "base_err_lse": max_err(bl, rl)}

    def errors(self, case, result, ref) -> dict | None:
        """Errors of this rank's output (collective: the reference is broadcast to every rank)."""
        if not self.cfg.run.check:
            return None
        if getattr(self, "_ref_all", None) is None:     # one broadcast per sweep point, not per case
            self._ref_all = self.ctx.world.mpi.bcast(
                None if ref is None else {k: (v.cpu() if torch.is_tensor(v) else v) for k, v in ref.items()}, root=0)
        ref = self._ref_all
        if result is None:                    # an idle rank (local method on rank > 0)
            return {"err_out": 0.0, "err_lse": 0.0, "base_err_out": ref["base_err_out"],
                    "base_err_lse": ref["base_err_lse"], "nonfinite_out": 0}
        out, lse = result
        return {"err_out": max_err(out.cpu(), ref["out"]), "err_lse": max_err(lse.cpu(), ref["lse"]),
                "base_err_out": ref["base_err_out"], "base_err_lse": ref["base_err_lse"],
                "nonfinite_out": count_nonfinite(out, lse)}

    def gathered_outputs(self, case, result):
        """Outputs to save (rank 0's replicated copy): dict name -> float32 numpy, or None."""
        if self.r != 0 or result is None:
            return None
        return {"out": result[0].float().cpu().numpy(), "lse": result[1].float().cpu().numpy()}


def variant(cfg, method: str, p: int) -> str:
    """The case variant: tree's reduction and topology (and ``fused`` when its merge is fused); the
    other methods have none."""
    if method == "tree":
        fused = cfg.tree.fused_merge and cfg.tree.reduction == "allgather" and cfg.tree.topology == "flat"
        return f"{cfg.tree.reduction}/{cfg.tree.topology}" + ("/fused" if fused else "")   # same variant = one case
    return ""


def estimate(cfg, method: str, p: int) -> tuple[int, int, int]:
    """(peak bytes of tensors on the busiest rank, payload bytes per rank per step, the part of
    the first that is rank 0's reference copy) - a plan. With ``run.check`` (or ``local`` among
    the sweep point's methods) rank 0 also holds the whole KV cache (B, N, Hkv, d) x 2, plus the
    float64 reference's working set (:func:`hpcattn.jobs.check.reference_state_bytes`)."""
    s = cfg.shape
    e = torch.empty(0, dtype=DTYPES[s.dtype]).element_size()
    lengths = s.lengths if s.lengths is not None else [s.context] * s.batch
    t = max(max(shard_lengths(lengths, p, r), default=0) for r in range(p))
    kv = lambda n: 2 * s.batch * n * s.heads_kv * s.head_dim * e  # noqa: E731
    state = s.batch * s.heads_q * (s.head_dim + 1) * 4
    ref = 0
    if cfg.run.check or "local" in cfg.methods:     # DecodeJob.k_full / v_full (the local case's own inputs)
        ref = 0 if method == "local" else kv(s.context)
    if cfg.run.check:
        ref += reference_state_bytes(s.batch, 1, s.heads_q, s.heads_kv, s.head_dim, s.context)
    if method == "local":
        return kv(s.context) + state + ref, 0, ref
    if method == "tree":
        if p == 1:
            return kv(t) + state + ref, 0, ref
        msg = state if cfg.tree.reduction == "allgather" else state + s.batch * s.heads_q * 4
        return kv(t) + state * (p + 2) + ref, msg, ref
    if method == "ring":
        return 3 * kv(t) + state * 2 + ref, (p - 1) * kv(t), ref
    raise ValueError(method)
