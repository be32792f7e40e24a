"""APB prefill (spec apb.md), attention level: anchor block carrying the query, compressed
"passing blocks" of KV from the ranks before, one all-gather per layer.

Rank r holds context block [r*lb, (r+1)*lb). Ranks r > 0 prepend an anchor of ``la`` rows built as
``ctx[:s] ++ query ++ ctx[s : la - ql]`` (header offset s; without the query: ``ctx[:la]``). Every
rank scores its local rows with a compressor, masks its first ``la`` rows (the anchor on r > 0, the
first la block rows on rank 0, as APB's code does), keeps the top ``lp`` rows per KV head, and
all-gathers the selected post-RoPE K/V. Rank r attends with the mask:

    anchor rows : anchor keys, causal
    block rows  : passing keys of ranks 0..r-1 | all anchor keys | block keys causal

computed exactly with stock calls (spec section 6): anchor = one square-causal call; block rows =
non-causal over [passing | anchor] + square-causal over the block, merged by LSE. Rank 0 is plain
causal attention over its block. Outputs are the block rows' states.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from hpcattn.errors import ConfigError
from hpcattn.kernels import Kernel
from hpcattn.kernels.merge import merge_pair
from hpcattn.timing import NullTimer

# the paper's settings for H = 8 (spec apb.md section 9): n -> (la, lp)
PRESETS_H8 = {32768: (1024, 512), 65536: (2048, 1024), 131072: (4096, 2048), 262144: (8192, 4096),
              524288: (8192, 8192)}


@dataclass
class APBParams:
    la: int                 # anchor length (0 = no anchor)
    lp: int                 # passing length per rank and KV head (0 = no passing blocks)
    query_offset: int = 0   # s: header tokens before the query inside the anchor
    query_in_anchor: bool = True
    pool: int = 5           # max-pool window of the scores along the sequence (odd)


def preset(n: int, p: int) -> tuple[int, int]:
    """(la, lp) for context n on p ranks: the paper's table for p = 8, else la = lb/4, lp = lb/8."""
    if p == 8 and n in PRESETS_H8:
        return PRESETS_H8[n]
    lb = n // p
    return max(lb // 4, 1), max(lb // 8, 1)


def validate(n: int, p: int, ql: int, prm: APBParams) -> None:
    """One clear error for settings APB cannot run with."""
    if n % p:
        raise ConfigError(f"apb: context {n} must be divisible by the {p} ranks")
    lb = n // p
    if prm.la < 0 or prm.lp < 0:
        raise ConfigError("apb: anchor_len and passing_len must be >= 0")
    if prm.la > lb:
        raise ConfigError(f"apb.anchor_len={prm.la} is larger than the block (context/ranks = {lb})")
    if prm.query_in_anchor and prm.la and prm.la < prm.query_offset + ql:
        raise ConfigError(f"apb.anchor_len={prm.la} is smaller than query_offset + query length = "
                          f"{prm.query_offset} + {ql}")
    if prm.lp > lb - prm.la:
        raise ConfigError(f"apb.passing_len={prm.lp} is larger than the selectable block rows "
                          f"(block {lb} - anchor_len {prm.la} = {lb - prm.la})")
    if prm.pool < 1 or prm.pool % 2 == 0:
        raise ConfigError(f"apb.score_pool={prm.pool} must be an odd number >= 1")


def local_rows(q, k, v, qq, kq, vq, r: int, p: int, prm: APBParams):
    """Rank r's rows [anchor | block] of the context tensors (B, n, H, d) (no anchor on rank 0):
    returns (la, q_loc, k_loc, v_loc)."""
    lb = q.shape[1] // p
    blk = slice(r * lb, (r + 1) * lb)
    la = prm.la if r > 0 else 0
    if not la:
        return 0, q[:, blk], k[:, blk], v[:, blk]
    return (la, *(torch.cat([anchor_rows(x, xq, prm), x[:, blk]], 1) for x, xq in ((q, qq), (k, kq), (v, vq))))


def passing_from(recv: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The passing K and V rank r uses: blocks of ranks 0..r-1 of the all-gathered
    (p, B, lp, Hkv, 2d) buffer, as (B, r*lp, Hkv, d) each."""
    _, B, lp, H, d2 = recv.shape
    prev = recv[:r].permute(1, 0, 2, 3, 4).reshape(B, r * lp, H, d2)
    return prev[..., : d2 // 2], prev[..., d2 // 2:]


def anchor_rows(x: torch.Tensor, xq: torch.Tensor | None, prm: APBParams) -> torch.Tensor:
    """The anchor's rows of a context tensor x (B, n, H, d) with the query xq (B, ql, H, d) spliced
    in after the header: ctx[:s] ++ query ++ ctx[s : la - ql]  ->  (B, la, H, d). Also for token
    ids: x (B, n), xq (B, ql) -> (B, la) (the model runner's anchor)."""
    if not prm.query_in_anchor or xq is None or xq.shape[1] == 0:
        return x[:, : prm.la]
    s, ql = prm.query_offset, xq.shape[1]
    return torch.cat([x[:, :s], xq, x[:, s: prm.la - ql]], 1)


# -- compressors: (q, k, v) of the local rows -> scores (B, S, Hkv) ----------------------------------

def score_query_aware(k: torch.Tensor, q_query: torch.Tensor) -> torch.Tensor:
    """Training-free score: mean over query rows of <K[j, g], mean over group g's heads of Q>.

    k: (B, S, Hkv, d); q_query: (B, ql, Hq, d). Returns (B, S, Hkv) float32 (float64 for float64)."""
    B, ql, Hq, d = q_query.shape
    Hkv = k.shape[2]
    acc = torch.float64 if k.dtype == torch.float64 else torch.float32
    qbar = q_query.to(acc).view(B, ql, Hkv, Hq // Hkv, d).mean(3)              # (B, ql, Hkv, d)
    return torch.einsum("bshd,bqhd->bsh", k.to(acc), qbar) / ql


def score_random(shape: tuple[int, int, int], seed: int, rank: int, device, layer: int = 0) -> torch.Tensor:
    """Random scores (the ablation compressor), distinct per rank and layer, reproducible."""
    g = torch.Generator().manual_seed(seed * 1000003 + rank + 7919 * layer)
    return torch.rand(shape, generator=g, dtype=torch.float64).to(device)


class RetainingHeads:
    """Locret-style retaining heads: per layer fc1 (1024 x (Hq + 2 Hkv) d) and fc2 (Hkv x 1024),
    score = fc2(silu(fc1([Q_pre | K_pre | V_pre]))). Loaded from a safetensors file whose keys match
    ``regex`` (groups: layer index, fc1|fc2); shapes are checked; the file's SHA-256 is kept."""

    def __init__(self, path: str, regex: str, n_heads: int, n_kv: int, d: int, layers: list[int]):
        from safetensors.torch import load_file

        try:
            state = load_file(path)
        except (OSError, FileNotFoundError) as e:
            raise ConfigError(f"apb.retaining_heads_path: cannot read {path}: {e}") from None
        self.sha256 = hashlib.sha256(open(path, "rb").read()).hexdigest()
        pat = re.compile(regex)
        found: dict[tuple[int, str], torch.Tensor] = {}
        for key, t in state.items():
            m = pat.search(key)
            if m:
                found[(int(m.group(1)), m.group(2))] = t
        width = (n_heads + 2 * n_kv) * d
        self.w = {}
        for layer in layers:
            for fc in ("fc1", "fc2"):
                if (layer, fc) not in found:
                    raise ConfigError(f"apb.retaining_heads_path: {path} has no {fc} for layer {layer} "
                                      f"(regex {regex!r})")
            fc1, fc2 = found[(layer, "fc1")], found[(layer, "fc2")]
            if fc1.shape[1] != width or fc2.shape != (n_kv, fc1.shape[0]):
                raise ConfigError(f"apb.retaining_heads_path: layer {layer}: fc1 {tuple(fc1.shape)}, fc2 "
                                  f"{tuple(fc2.shape)}; expected fc1 (H, {width}) and fc2 ({n_kv}, H)")
            self.w[layer] = (fc1, fc2)

    def score(self, layer: int, q, k, v) -> torch.Tensor:
        """q (B,S,Hq,d), k/v (B,S,Hkv,d) pre-RoPE -> (B, S, Hkv) float32."""
        fc1, fc2 = self.w[layer]
        B, S = q.shape[:2]
        x = torch.cat([q.reshape(B, S, -1), k.reshape(B, S, -1), v.reshape(B, S, -1)], -1)
        acc = torch.float64 if q.dtype == torch.float64 else torch.float32
        h = F.silu(x.to(acc) @ fc1.to(x.device, acc).T)
        return h @ fc2.to(x.device, acc).T


def make_compressor(kind: str | RetainingHeads, *, seed: int = 0, query: torch.Tensor | None = None,
                    layer: int = 0):
    """The one APB compressor factory (the attention-level job, its projection and the model's
    per-layer prefill all build theirs here): ``compressor(q_loc, k_loc, v_loc, rank) -> scores (B,
    S, Hkv)`` of a rank's rows q_loc (B, S, Hq, d), k_loc/v_loc (B, S, Hkv, d) (pre-RoPE in the
    model). ``kind``: ``"query_aware"`` scores the keys against ``query`` (B, ql, Hq, d), the query
    rows' Q; ``"random"`` draws reproducible scores per (``seed``, rank, ``layer``); a
    :class:`RetainingHeads` scores with its heads of layer ``layer``."""
    if kind == "query_aware":
        return lambda ql_, kl, vl, rank: score_query_aware(kl, query)
    if kind == "random":
        return lambda ql_, kl, vl, rank: score_random(kl.shape[:3], seed, rank, kl.device, layer)
    if not isinstance(kind, RetainingHeads):
        raise ValueError(f"APB compressor: {kind!r} is not query_aware, random or RetainingHeads")
    return lambda ql_, kl, vl, rank: kind.score(layer, ql_, kl, vl)


def pool_scores(score: torch.Tensor, window: int) -> torch.Tensor:
    """Max-pool (B, S, H) scores along S with an odd window (stride 1, same length)."""
    if window <= 1:
        return score
    x = score.transpose(1, 2)
    return F.max_pool1d(x, window, stride=1, padding=window // 2).transpose(1, 2)


def select_passing(score: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lp: int,
                   la: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-lp local rows per KV head, rows [0, la) excluded.

    score (B, S, Hkv); k, v (B, S, Hkv, d) -> (send buffer (B, lp, Hkv, 2d) contiguous [K | V],
    selected local row indices (B, lp, Hkv))."""
    s = score.clone()
    s[:, :la] = float("-inf")
    idx = s.topk(lp, dim=1).indices                                         # (B, lp, Hkv)
    gi = idx.unsqueeze(-1).expand(-1, -1, -1, k.shape[-1])
    return torch.cat([k.gather(1, gi), v.gather(1, gi)], -1).contiguous(), idx


def apb_attention(q_loc, k_loc, v_loc, passing_k, passing_v, la: int, *, kernel: Kernel, scale: float):
    """APB's masked attention on a rank r > 0, exactly, with stock calls.

    q_loc (B, la + lb, Hq, d) = [anchor | block]; k_loc, v_loc likewise with Hkv heads;
    passing_k/v (B, P, Hkv, d). Returns the block rows' (out (B, lb, Hq, d), lse (B, Hq, lb))."""
    qb = q_loc[:, la:]
    pre_k = torch.cat([passing_k, k_loc[:, :la]], 1)
    pre_v = torch.cat([passing_v, v_loc[:, :la]], 1)
    o2, l2 = kernel(qb, k_loc[:, la:], v_loc[:, la:], scale=scale, causal="square")
    if pre_k.shape[1] == 0:
        return o2, l2
    o1, l1 = kernel(qb, pre_k, pre_v, scale=scale, causal="none")
    o, l = merge_pair(o1, l1, o2, l2)
    return o.to(q_loc.dtype), l


def exchanges(prm: APBParams, p: int) -> bool:
    """Whether APB exchanges passing blocks at all (passing_len > 0 on more than one rank)."""
    return bool(prm.lp) and p > 1


def apb_layer(q_loc, k_loc, v_loc, la: int, scores, ctx, prm: APBParams, *, kernel: Kernel, scale: float,
              tm=NullTimer(), select_as: str = "merge", attend_as: str = "compute"):
    """APB's per-layer exchange on this rank: select -> all-gather -> passing block -> attention.
    The one implementation, used by the attention-level job (:func:`apb_prefill`) and the model
    runner (:mod:`hpcattn.model.approx_prefill`).

    q_loc (B, la + lb, Hq, d), k_loc / v_loc (B, la + lb, Hkv, d): this rank's post-RoPE rows
    [anchor | block] (``la`` = 0: no anchor rows, always so on rank 0); ``scores()`` -> (B, la + lb,
    Hkv) the compressor's scores of these rows, called only when blocks are exchanged
    (:func:`exchanges`). Every rank keeps its top ``prm.lp`` rows per KV head (its first ``prm.la``
    rows excluded, rank 0 too), all-gathers them as (p, B, lp, Hkv, 2d) [K | V], and rank r > 0
    attends with the passing blocks of ranks 0..r-1 (:func:`apb_attention`); rank 0 is plain causal.

    Timed as ``tm(select_as)`` (scoring and selection), ``tm("comm")`` (the all-gather) and
    ``tm(attend_as)`` (the attention). Returns the block rows' (out (B, lb, Hq, d), lse (B, Hq,
    lb)) and the selected local row indices (B, lp, Hkv) or None.
    """
    p, r = ctx.size, ctx.rank
    passing_k = passing_v = k_loc[:, :0]
    idx = None
    if exchanges(prm, p):
        with tm(select_as):
            send, idx = select_passing(pool_scores(scores(), prm.pool), k_loc, v_loc, prm.lp, prm.la)
        with tm("comm"):
            recv = ctx.world.allgather(send)                                # (p, B, lp, Hkv, 2d)
        passing_k, passing_v = passing_from(recv, r)
    with tm(attend_as):
        if r == 0:
            o, l = kernel(q_loc, k_loc, v_loc, scale=scale, causal="square")
        else:
            o, l = apb_attention(q_loc, k_loc, v_loc, passing_k, passing_v, la, kernel=kernel, scale=scale)
    return o, l, idx


def apb_prefill(q, k, v, qq, kq, vq, ctx, prm: APBParams, *, kernel: Kernel, scale: float,
                compressor, tm=NullTimer()):
    """APB prefill of this rank's block (one layer, attention level).

    q, k, v: (B, n, H, d) context views (a rank reads its block and the anchor rows);
    qq, kq, vq: (B, ql, H, d) the query rows (for the anchor and the query-aware score);
    compressor(q_loc, k_loc, v_loc, rank) -> (B, la + lb, Hkv) scores.
    Returns (out (B, lb, Hq, d), lse (B, Hq, lb), selected local row indices (B, lp, Hkv) or None;
    local row j is anchor row j for j < la on ranks r > 0, else block row j - la).
    """
    with tm("compute"):
        la, q_loc, k_loc, v_loc = local_rows(q, k, v, qq, kq, vq, ctx.rank, ctx.size, prm)
    return apb_layer(q_loc, k_loc, v_loc, la, lambda: compressor(q_loc, k_loc, v_loc, ctx.rank), ctx, prm,
                     kernel=kernel, scale=scale, tm=tm)
