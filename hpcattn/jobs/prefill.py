"""The attention-level prefill job: causal (or full) attention of a sequence of ``shape.context``
tokens, sharded over ranks.

Methods: ``local`` (rank 0 computes the whole sequence: the single-device baseline), ``ring``
(exact), ``torch_cp`` (PyTorch's own ring, ``context_parallel``: the peer; GPUs only), and the
approximate ``star`` (phase 1) and ``apb``, which also get ``shape.query_len`` query rows after
the context. The check compares ``run.check_rows`` evenly spaced rows (gathered
from the ranks that own them) with a float64 reference computed on rank 0: exact methods must pass
flash-attention's tolerance rule; approximate ones record their fidelity (relative and max error
of the context rows) and must pass the rule on their exact part, the query pass (Star phase 2).
With ``inputs.needles`` planted keys, APB also records the needle recall of its passing blocks.
"""

from __future__ import annotations

import torch

from hpcattn.dtypes import DTYPES
from hpcattn.jobs.check import count_nonfinite, max_err, reference_state, reference_state_bytes
from hpcattn.jobs.inputs import InputSource, needle_positions, plant_needles
from hpcattn.jobs.params import apb_params, attention_level_compressor, star_geometry
from hpcattn.methods import local_attention, ring_prefill
from hpcattn.methods.apb import RetainingHeads, apb_prefill
from hpcattn.methods.sharding import gather_in_order, layout_indices
from hpcattn.methods.star import star_blocks, star_phase1, star_query
from hpcattn.methods.torch_cp import TorchContextParallel

APPROX = ("star", "apb")


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
        self.ql = s.query_len
        self.query = tuple(src.range(x, 0, self.ql) for x in ("qq", "kq", "vq")) if self.ql else None
        self.needles = needle_positions(self.n, self.p, cfg.inputs.needles) if self.ql else needle_positions(0, 1, 0)

        def load(index):
            q, k, v = (src.tokens(x, index) for x in ("q", "k", "v"))
            if len(self.needles):
                plant_needles(k, index, self.needles, self.query[0])
            return q, k, v

        self.q, self.k, self.v = load(self.index)
        self.full = None
        if any(m in APPROX + ("torch_cp",) for m in cfg.methods) or \
                (self.r == 0 and ("local" in cfg.methods or cfg.run.check)):
            self.full = load(torch.arange(self.n))
        self.rows = check_rows(self.n, cfg.run.check_rows)
        self.recall = None

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
        if case.method == "torch_cp":
            t = case.cfg.torch_cp
            self.peer = None                      # free the previous case's shards first
            self.peer = TorchContextParallel(*self.full, self.ctx, scale=sc, causal=self.causal,
                                             sdpa=t.sdpa, native_gqa=t.native_gqa)
            return lambda tm: (self.peer(tm), None)
        if case.method == "star":
            q, k, v = self.full
            blocks = self.star_blocks(case)
            anchor = star_geometry(case.cfg, self.p)[1]
            return lambda tm: star_phase1(q, k, v, blocks=blocks, anchor=anchor, kernel=kern, scale=sc, tm=tm)
        if case.method == "apb":
            q, k, v = self.full
            prm = apb_params(case.cfg, self.p)
            comp = self.compressor(case)

            def run(tm):
                o, l, idx = apb_prefill(q, k, v, *self.query, self.ctx, prm, kernel=kern, scale=sc,
                                        compressor=comp, tm=tm)
                self.last_idx = idx
                return o, l
            return run
        raise ValueError(case.method)

    def star_blocks(self, case):
        return star_blocks(self.n, star_geometry(case.cfg, self.p)[0], self.p)[self.r]

    def compressor(self, case):
        """compressor(q_loc, k_loc, v_loc, rank) -> scores (B, S, Hkv) for APB."""
        comp, kind = attention_level_compressor(case.cfg, self.query[0])
        if isinstance(kind, RetainingHeads):
            self.heads_sha256 = kind.sha256
        return comp

    def _owned(self, case, result):
        """(global indices, out, lse) of the rows this rank computed for ``case``."""
        if result is None:
            return None
        out, lse = result
        if case.method == "local":
            index = torch.arange(self.n)
        elif case.method == "star":
            index = torch.cat([torch.arange(a, b) for a, b in self.star_blocks(case)] or [torch.zeros(0, dtype=torch.long)])
        elif case.method == "apb":
            lb = self.n // self.p
            index = torch.arange(self.r * lb, (self.r + 1) * lb)
        elif case.method == "torch_cp":
            index = self.peer.index
        else:
            index = self.index
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
            mine = (index[sel], out[:, sel_d].float().cpu(), None if lse is None else lse[:, :, sel_d].float().cpu(),
                    count_nonfinite(out, lse))              # NaN/Inf in any row, checked or not
        parts = self.ctx.world.mpi.gather(mine, root=0)
        if self.r != 0:
            return None
        parts = [pp for pp in parts if pp is not None]
        idx = torch.cat([pp[0] for pp in parts])
        out = torch.cat([pp[1] for pp in parts], dim=1)
        order = torch.argsort(idx)
        if not torch.equal(idx[order], self.rows):
            raise RuntimeError(f"{case.method}: gathered rows do not cover the checked rows")
        o, ro = out[:, order].double(), ref["out"].cpu().double()
        res = {"err_out": max_err(o, ro), "base_err_out": ref["base_err_out"], "base_err_lse": ref["base_err_lse"],
               "nonfinite_out": sum(pp[3] for pp in parts)}
        if parts[0][2] is not None:                   # torch_cp returns no lse: outputs only
            lse = torch.cat([pp[2] for pp in parts], dim=2)
            res["err_lse"] = max_err(lse[:, :, order], ref["lse"].cpu())
        if case.method in APPROX:
            res["fidelity_rel_err"] = float((o - ro).norm() / ro.norm())
        return res

    def approx_extras(self, case, result, ref) -> dict:
        """Star/APB (collective): the query pass (Star phase 2, exact) against the reference, and
        APB's needle recall. Rank 0 gets the dict; other ranks {}."""
        if case.method not in APPROX:
            return {}
        q, k, v = self.full
        qq, kq, vq = self.query
        if case.method == "star":
            blocks = self.star_blocks(case)
            sel = torch.cat([torch.arange(a, b) for a, b in blocks] or [torch.zeros(0, dtype=torch.long)])
            every = star_blocks(self.n, star_geometry(case.cfg, self.p)[0], self.p)
            last = max(i for i in range(self.p) if every[i])        # the query host
        else:
            lb = self.n // self.p
            sel, last = torch.arange(self.r * lb, (self.r + 1) * lb), self.p - 1
        sel = sel.to(k.device)
        oq, lq = star_query(qq, kq, vq, k[:, sel], v[:, sel], self.ctx, kernel=self.kernel, scale=self.scale,
                            is_last=self.r == last, quirk=case.cfg.star.compat_remote_causal_quirk)
        recall = None
        if case.method == "apb" and len(self.needles) and getattr(self, "last_idx", None) is not None:
            la = apb_params(case.cfg, self.p).la if self.r > 0 else 0
            lb = self.n // self.p
            glob = self.r * lb + (self.last_idx.cpu() - la)                      # (B, lp, Hkv) global rows
            mine = self.needles[(self.needles >= self.r * lb) & (self.needles < (self.r + 1) * lb)]
            hit = sum(int((glob[b, :, h] == n).any()) for n in mine.tolist()
                      for b in range(glob.shape[0]) for h in range(glob.shape[2]))
            recall = (hit, len(mine) * glob.shape[0] * glob.shape[2]) if self.r < self.p - 1 else (0, 0)
        parts = self.ctx.world.mpi.gather(recall, root=0)
        if self.r != 0:
            return {}
        if getattr(self, "_query_ref", None) is None:   # once per sweep point (rank 0)
            kk, vv = torch.cat([k, kq], 1), torch.cat([v, vq], 1)
            rq = reference_state(qq, kk, vv, scale=self.scale, q_pos=torch.arange(self.n, self.n + self.ql))
            bq, blq = self.kernel(qq, kk, vv, scale=self.scale, causal="bottom_right")
            self._query_ref = rq, max_err(bq, rq[0]), max_err(blq, rq[1])
        rq, base_o, base_l = self._query_ref
        e = {"query_err_out": max_err(oq, rq[0]), "query_err_lse": max_err(lq, rq[1]),
             "query_base_err_out": base_o, "query_base_err_lse": base_l}   # the verdict's figures
        if case.method == "apb" and any(pp for pp in parts):
            hits, total = map(sum, zip(*[pp for pp in parts if pp]))
            e["needle_recall"] = hits / total if total else None
        return e

    def gathered_outputs(self, case, result):
        """All rows gathered to rank 0 in global order (collective, one gather): dict of float32
        numpy ``out`` (B, N, Hq, d) and, where the method returns one, ``lse`` (B, Hq, N), or None."""
        index, out, lse = self._owned(case, result) or (None, None, None)
        rows = None if out is None else out.float()
        if lse is not None:             # [out | lse] along d: (B, n, Hq, d + 1)
            rows = torch.cat([rows, lse.float().transpose(1, 2).unsqueeze(-1)], dim=-1)
        both = gather_in_order(self.ctx.world, index, rows, 1)
        if self.r != 0:
            return None
        if both is None:
            return {}
        d = case.cfg.shape.head_dim
        res = {"out": both[..., :d].numpy()}
        if both.shape[-1] > d:
            res["lse"] = both[..., d].transpose(1, 2).contiguous().numpy()
        return res


TIMED_WORK = {
    "star": "attention level: the block rows over [anchor | block] only; in a model the anchor rows' own causal "
            "attention and the anchor tokens' projections and MLP are also computed (hpcattn project of a "
            "generate config charges them)",
    "apb": "attention level: the block rows (passing | anchor | block) and the scoring/selection only; in a model "
           "the anchor rows' own causal attention and the anchor tokens' projections and MLP are also computed "
           "(hpcattn project of a generate config charges them)",
}


def variant(cfg, method: str, p: int) -> str:
    """The case variant: Star's block and anchor, APB's anchor and passing lengths and compressor,
    ring's layout, torch_cp's SDPA backend and GQA mode, and the mask (causal or full)."""
    if method == "star":
        return "block{}/anchor{}".format(*star_geometry(cfg, p)) + \
            ("/quirk" if cfg.star.compat_remote_causal_quirk else "")
    if method == "apb":
        prm = apb_params(cfg, p)
        flags = "" if cfg.apb.query_in_anchor or not prm.la else "/noquery"
        return f"la{prm.la}/lp{prm.lp}/{cfg.apb.compressor}{flags}"
    mask = "causal" if cfg.shape.causal else "full"
    if method == "ring":
        return f"{cfg.ring.layout if p > 1 else 'contiguous'}/{mask}"
    if method == "torch_cp":
        return f"{cfg.torch_cp.sdpa}/{'gqa' if cfg.torch_cp.native_gqa else 'kv-expanded'}/{mask}"
    return mask


def timed_work(method: str) -> str:
    """What a prefill case's time covers (record attribute ``timed_work``): "" for the exact methods
    (all rows), a plain statement of the rows left out for the approximate ones."""
    return TIMED_WORK.get(method, "")


def estimate(cfg, method: str, p: int) -> tuple[int, int, int]:
    """(peak bytes of tensors on the busiest rank, payload bytes per rank per step, the part of
    the first that is rank 0's reference copy) - a plan. With ``run.check`` (or ``local`` among
    the sweep point's methods) rank 0 also holds the whole q, k, v (``PrefillJob.full``); with
    ``run.check`` the float64 reference's working set on ``run.check_rows`` rows and the
    same-dtype baseline's whole output, with ``run.save_outputs`` the gathered out/lse (float32;
    the larger of those two, they never coexist)."""
    s = cfg.shape
    e = torch.empty(0, dtype=DTYPES[s.dtype]).element_size()
    qkv = lambda n: s.batch * n * (s.heads_q + 2 * s.heads_kv) * s.head_dim * e  # noqa: E731
    acc = lambda n: s.batch * n * s.heads_q * (s.head_dim + 1) * 4  # noqa: E731
    holds_full = method in ("local", "torch_cp", "star", "apb")
    ref = qkv(s.context) if (cfg.run.check or "local" in cfg.methods) and not holds_full else 0
    if cfg.run.check:
        ref += reference_state_bytes(s.batch, min(cfg.run.check_rows, s.context), s.heads_q, s.heads_kv,
                                     s.head_dim, s.context)
    if cfg.run.check or cfg.run.save_outputs:     # baseline output (B, N, Hq, d) + lse, or the gathered one
        ref += max(s.batch * s.context * s.heads_q * (s.head_dim * e + 4) if cfg.run.check else 0,
                   acc(s.context) if cfg.run.save_outputs else 0)
    if method == "local":
        return qkv(s.context) + acc(s.context) + ref, 0, ref
    t = -(-s.context // p)
    kvblock = 2 * s.batch * t * s.heads_kv * s.head_dim * e
    if method == "ring":
        return qkv(t) + 2 * kvblock + acc(t) + ref, (p - 1) * kvblock, ref
    if method == "torch_cp":  # full inputs + (B, H, t, d) shards with K/V expanded to Hq heads
        wire = kvblock * (s.heads_q // s.heads_kv if not cfg.torch_cp.native_gqa else 1)
        return qkv(s.context) + qkv(t) + 2 * wire + acc(t) + ref, (p - 1) * wire, ref
    if method == "star":      # the whole context is held (inputs), anchor + block computed
        return qkv(s.context) + acc(2 * t) + ref, 0, ref
    if method == "apb":
        lp = apb_params(cfg, p).lp
        return qkv(s.context) + acc(2 * t) + ref, 2 * s.batch * lp * s.heads_kv * s.head_dim * e, ref
    raise ValueError(method)
