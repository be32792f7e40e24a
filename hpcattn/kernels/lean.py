"""LeanAttention-style stream-K decode attention in Triton (spec ``lean_attention.md``, issue 6).

Public entry: :func:`lean_decode`. Layouts are hpcattn's convention (``kernels/__init__.py``)::

    q      (B, Sq, Hq, d)    any strides; Sq = 1 for decode, small Sq (<= 128 / G) for speculative
                             verification
    k, v   (B, Sk, Hkv, d)   any strides; fastest when physically head-major (a (B, S, H, d) view of
                             a contiguous (B, H, S, d) buffer, see ``kernels.head_major``): one KV
                             tile of one head is then one contiguous block
    out    (B, Sq, Hq, d)    in q.dtype
    lse    (B, Hq, Sq)       float32, natural log, softmax scale included; empty state (0, -inf)

Schedule (stream-K). A *work unit* (LeanTile) is one tile of ``BLOCK_N`` keys of one *segment*
(sequence b, KV head h). The units of all segments are laid end to end in (b, h, tile) order::

    seg_start[s] = sum_{s' < s} ceil(len(s') / BLOCK_N),   s = b * Hkv + h,   T = seg_start[S]

and the T units are cut into P (= ``num_programs``) contiguous ranges whose sizes differ by at most
one: program c owns units [c*base + min(c, rem), ... + base + (c < rem)) with base = T // P,
rem = T % P. Sequences of length 0 own no unit; tile counts come from the real lengths, so no
padding is ever read. Each program walks its range one segment at a time: for every (program c,
segment s) *piece* it loads the G*Sq packed query rows of (b, h) once (GQA packing: every KV tile is
read once for all G query heads of its KV head), runs base-2 online softmax over its tiles and
stores the piece's partial state (normalised o, base-2 lse) in fp32 scratch slot ``c + s``.

Aligned split (``split="aligned"``, the automatic choice when every sequence has the same length,
e.g. B = 1). With P a multiple of S, program c works on segment s = c // (P/S) only, and the P/S
programs of a segment split its tiles into ranges whose sizes differ by at most one. No program
then straddles two segments: in the stream-K split about S programs do, and each straddle costs
that program a second Q load and a drained load pipeline, on the kernel's critical path (one
H200, B = 1, 16K keys: ~2.5 us of a 22 us main pass, see docs/performance.md). For ragged batches
the stream-K split balances the work and stays the default.

Slot ``c + s`` is unique (in the aligned split trivially, s being a function of c): if c < c'
both touch segments s and s', then s <= s' (ranges are contiguous and ordered), so c + s = c' + s'
is impossible unless (c, s) = (c', s'). Hence S + P slots always suffice, whatever the lengths, and
the pieces of segment s sit in slots c + s for c = prog_of(seg_start[s]) .. prog_of(seg_start[s+1]
- 1) (aligned: c = s*P/S .. (s+1)*P/S - 1).

Reduction (``reduction=``):

* ``"two_kernel"`` (default, portable): a second Triton kernel, a few programs per segment (one
  per 32 head-dim columns), merges the segment's pieces (README section 2 merge in base 2,
  empty-state safe), converts lse to natural log and writes (out, lse). Segments of length 0 get
  (0, -inf) here.
* ``"fused"``: no second launch. A program whose piece covers a whole segment writes the final
  state directly; otherwise it stores its partial, then increments a per-segment arrival counter
  (``atomic_add``, acq_rel); the program that arrives last merges all pieces and resets the
  counter to 0. Nobody waits for anybody, so there is no co-residency requirement and no deadlock
  (unlike the host/spin-wait protocols of ORT and AITER). Counters live in one cached zeroed int32
  buffer per device; do not run two fused launches concurrently on two streams of one device. Checked in the interpreter (sequential programs); GPU memory ordering is the CUDA
  "threadfence reduction" pattern (barrier, release/acquire atomic, L1-bypassing partial loads).

The schedule is computed on the device: every program reads the (B,) int32 lengths, derives the
tile counts, their prefix sums, T and its own first segment in registers (a few vector reductions
over B), and walks from there; the merge pass does the same for its segment. No host plan exists,
so the lengths may be a device tensor that changes between launches: one captured CUDA graph then
serves every decode step as the cache grows (``k_lengths`` as a tensor; :func:`schedule` is the
host mirror of the same arithmetic, for tests). Host lengths are copied to the device once and
cached; ``k_lengths=None`` (all Sk keys) copies nothing: the kernels take Sk as an argument. The
only torch code here is argument checking and allocation; all attention math is in the Triton
kernels.

KV loads: pointer loads (any strides) or, with ``tma=True``, TMA tensor descriptors over the
(B*Hkv*Sk, d) rows of a head-major contiguous cache (Hopper and later). A TMA tile may run past a
piece's last key into the next segment's rows; those keys are masked in registers (scores -inf,
V rows zeroed), so NaN in unused cache capacity never leaks. Measured no faster than pointer loads
on one H200 (docs/performance.md), so off unless asked for (``TMA_DEFAULT``).
"""

from __future__ import annotations

import math
import os
from collections import OrderedDict

import numpy as np
import torch
import triton
import triton.language as tl

LN2 = 0.6931471805599453
LOG2E = 1.4426950408889634

MAX_ROWS = 128          # G * Sq packed query rows per program (decode / speculative verification)
MAX_HEAD_DIM = 256


# ------------------------------------------------------------------------------------------------
# Triton kernels


@triton.jit
def _prog_of(t, base, rem):
    """Index of the program that owns unit t (t < T), for the balanced split of T over P."""
    big = rem * (base + 1)
    return tl.where(t < big, t // (base + 1), rem + (t - big) // tl.maximum(base, 1))


@triton.jit
def _merge_pieces(PO, PL, slot0, npieces, rows, dd, row_ok, d_ok, R, D: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, CHUNK: tl.constexpr):
    """Merge the partial states in slots slot0 .. slot0+npieces-1 (base-2 lse): returns the
    normalised out (BLOCK_M, BLOCK_D) fp32 and base-2 lse (BLOCK_M,), (0, -inf) if empty.
    CHUNK pieces are loaded at once (one memory latency per chunk, not per piece)."""
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    den = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    pc = tl.arange(0, CHUNK)
    for i0 in range(0, npieces, CHUNK):
        p_ok = (i0 + pc) < npieces
        slot = (slot0 + i0 + pc).to(tl.int64)                                          # (CHUNK,)
        lse_c = tl.load(PL + slot[:, None] * R + rows[None, :], mask=p_ok[:, None] & row_ok[None, :],
                        other=float("-inf"), cache_modifier=".cg")                   # (CHUNK, BLOCK_M)
        o_c = tl.load(PO + slot[:, None, None] * R * D + rows[None, :, None] * D + dd[None, None, :],
                      mask=p_ok[:, None, None] & row_ok[None, :, None] & d_ok[None, None, :],
                      other=0.0, cache_modifier=".cg")                               # (CHUNK, BLOCK_M, BLOCK_D)
        m_new = tl.maximum(m, tl.max(lse_c, 0))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.math.exp2(m - m_use)
        w = tl.math.exp2(lse_c - m_use[None, :])                                      # 0 for empty pieces
        den = den * alpha + tl.sum(w, 0)
        acc = acc * alpha[:, None] + tl.sum(w[:, :, None] * o_c, 0)
        m = m_new
    ok = den > 0
    safe = tl.where(ok, den, 1.0)
    out = acc / safe[:, None]
    lse2 = tl.where(ok, m + tl.log2(safe), float("-inf"))
    return out, lse2


@triton.jit
def _store_final(OUT, LSE, o, lse2, b, h, gi, sq, dd, row_ok, d_ok,
                 sob, sos, soh, sod, slb, slh, sls, G: tl.constexpr, WRITE_LSE=True):
    """Write a segment's final state: out[b, sq, h*G+gi, dd] (q dtype), lse[b, h*G+gi, sq] (natural;
    only if WRITE_LSE)."""
    b64 = tl.cast(b, tl.int64)
    head = h * G + gi
    optr = OUT + b64 * sob + sq[:, None] * sos + head[:, None] * soh + dd[None, :] * sod
    tl.store(optr, o.to(OUT.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    tl.store(LSE + b64 * slb + head * slh + sq * sls, lse2 * 0.6931471805599453, mask=row_ok & WRITE_LSE)


@triton.jit
def _lens_plan(LENS, B, SK, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, UNIFORM: tl.constexpr):
    """The schedule's per-sequence figures from the device lengths (clamped to [0, SK]), or SK for
    every sequence if UNIFORM (LENS unread: no host-to-device copy per new length):
    (lengths (BLOCK_B,), tiles per segment (BLOCK_B,), tiles of the sequences before b (BLOCK_B,))."""
    ob = tl.arange(0, BLOCK_B)
    if UNIFORM:
        lens = tl.where(ob < B, SK, 0).to(tl.int32)
    else:
        lens = tl.load(LENS + ob, mask=ob < B, other=0).to(tl.int32)
    lens = tl.minimum(tl.maximum(lens, 0), SK)
    tiles = (lens + BLOCK_N - 1) // BLOCK_N
    return lens, tiles, tl.cumsum(tiles, 0) - tiles


@triton.jit
def _pick(vec, ob, b):
    """vec[b] of a (BLOCK_B,) register vector (0 when b is out of range)."""
    return tl.sum(tl.where(ob == b, vec, 0), 0)


@triton.jit
def _seg_start(s, tiles, excl, ob, Hkv, S, T):
    """seg_start[s] = sum of the tiles of segments before s (s = b * Hkv + h; seg_start[S] = T)."""
    b = s // Hkv
    return tl.where(s >= S, T, Hkv * _pick(excl, ob, b) + (s - b * Hkv) * _pick(tiles, ob, b))


@triton.jit
def _store_piece(PO, PL, slot, o, lse2, rows, dd, row_ok, d_ok, R, D: tl.constexpr):
    """A piece's partial state (normalised o (BLOCK_M, BLOCK_D), base-2 lse) into scratch slot."""
    slot = slot.to(tl.int64)
    tl.store(PO + slot * R * D + rows[:, None] * D + dd[None, :], o, mask=row_ok[:, None] & d_ok[None, :])
    tl.store(PL + slot * R + rows, lse2, mask=row_ok)


@triton.jit
def _load_q(Q, b, h, gi, sq, dd, row_ok, d_ok, sqb, sqs, sqh, sqd, G: tl.constexpr):
    """The G*Sq packed query rows of (sequence b, KV head h): (BLOCK_M, BLOCK_D), 0 past R / D."""
    return tl.load(Q + b.to(tl.int64) * sqb + sq[:, None] * sqs + (h * G + gi)[:, None] * sqh + dd[None, :] * sqd,
                   mask=row_ok[:, None] & d_ok[None, :], other=0.0)


@triton.jit
def _range_of(c, s_lo, nt, T, P, PPS, ALIGNED: tl.constexpr):
    """Units [start, end) of program c. Stream-K: the balanced split of all T units over P.
    ALIGNED (P = S * PPS): program c splits segment c // PPS (whose units start at s_lo, nt of
    them) with its PPS - 1 neighbours, so no program straddles two segments."""
    if ALIGNED:
        j = c - (c // PPS) * PPS
        start = s_lo + j * (nt // PPS) + tl.minimum(j, nt % PPS)
        end = start + nt // PPS + (j < nt % PPS).to(tl.int32)
    else:
        base = T // P
        rem = T % P
        start = c * base + tl.minimum(c, rem)
        end = start + base + (c < rem).to(tl.int32)
    return start, end


@triton.jit
def _pieces_of(s, lo, hi, T, P, PPS, ALIGNED: tl.constexpr):
    """(first program, number of programs) that hold pieces of segment s (units [lo, hi))."""
    if ALIGNED:
        c0 = s * PPS
        n = tl.minimum(PPS, hi - lo)
    else:
        c0 = _prog_of(lo, T // P, T % P)
        n = tl.where(hi > lo, _prog_of(hi - 1, T // P, T % P) - c0 + 1, 0)
    return c0, n


@triton.jit
def _lean_fwd(Q, K, V, KD, VD, PO, PL, OUT, LSE, LENS, CNT,
              sqb, sqs, sqh, sqd, skb, sks, skh, skd, svb, svs, svh, svd,
              sob, sos, soh, sod, slb, slh, sls,
              qk_scale, P, PPS, S, Hkv, B, SK,
              G: tl.constexpr, SQ: tl.constexpr, D: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
              BLOCK_B: tl.constexpr, CAUSAL: tl.constexpr, FUSED: tl.constexpr, ALIGNED: tl.constexpr,
              DOT_PREC: tl.constexpr, UPCAST_DOT: tl.constexpr,
              EVEN_D: tl.constexpr, MROWS: tl.constexpr, MCHUNK: tl.constexpr, UNIFORM: tl.constexpr,
              TMA: tl.constexpr, PDL: tl.constexpr):
    """Stream-K main pass: program c walks units [start, end) and stores one state per piece.
    The schedule comes from the device lengths LENS (B,), so one launch (or one captured graph)
    serves any lengths. EVEN_D: BLOCK_D == D (no head-dim masks on the KV loads). MROWS, MCHUNK:
    rows (next power of two >= G*Sq) and pieces per load of the fused reduction's merge."""
    c = tl.program_id(0)
    R = G * SQ
    ob = tl.arange(0, BLOCK_B)
    rows = tl.arange(0, BLOCK_M)
    dd = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    row_ok = rows < R
    d_ok = dd < D
    gi = rows // SQ                       # packed row r = gi * Sq + sq
    sq = rows % SQ
    s_own = c // PPS                      # ALIGNED: the one segment program c works on
    if PDL:   # the merge pass may launch now: it waits (gdc_wait) for this grid to finish
        tl.extra.cuda.gdc_launch_dependents()
    if ALIGNED:   # its query rows do not depend on the lengths: load them while LENS is in flight
        q_own = _load_q(Q, s_own // Hkv, s_own % Hkv, gi, sq, dd, row_ok, d_ok, sqb, sqs, sqh, sqd, G)
    lens_v, tiles_v, excl_v = _lens_plan(LENS, B, SK, BLOCK_B, BLOCK_N, UNIFORM)
    T = Hkv * tl.sum(tiles_v, 0)
    start, end = _range_of(c, _seg_start(s_own, tiles_v, excl_v, ob, Hkv, S, T),
                           _pick(tiles_v, ob, s_own // Hkv), T, P, PPS, ALIGNED)
    if ALIGNED and not FUSED:
        if start == end:   # no tile (segment shorter than P/S tiles): an empty piece for the merge
            _store_piece(PO, PL, c + s_own, tl.zeros([BLOCK_M, BLOCK_D], tl.float32),
                         tl.full([BLOCK_M], float("-inf"), tl.float32), rows, dd, row_ok, d_ok, R, D)

    if FUSED:
        # segments of length 0 own no unit: their empty state is written by program s % P
        for s0 in range(c, S, P):
            if _pick(lens_v, ob, s0 // Hkv) == 0:
                _store_final(OUT, LSE, tl.zeros([BLOCK_M, BLOCK_D], tl.float32),
                             tl.full([BLOCK_M], float("-inf"), tl.float32), s0 // Hkv, s0 % Hkv,
                             gi, sq, dd, row_ok, d_ok, sob, sos, soh, sod, slb, slh, sls, G)

    g = start
    # first segment: the last sequence whose units start at or before `start`, then its head
    # (a sequence of length 0 starts where the next one does, so it is never the last such one)
    b0 = tl.sum(((Hkv * excl_v <= start) & (ob < B)).to(tl.int32), 0) - 1
    s = b0 * Hkv + (start - Hkv * _pick(excl_v, ob, b0)) // tl.maximum(_pick(tiles_v, ob, b0), 1)
    s = tl.where(start < T, s, 0)
    while g < end:
        while _seg_start(s + 1, tiles_v, excl_v, ob, Hkv, S, T) <= g:  # skip segments of length 0
            s += 1
        seg_lo = _seg_start(s, tiles_v, excl_v, ob, Hkv, S, T)
        seg_hi = _seg_start(s + 1, tiles_v, excl_v, ob, Hkv, S, T)
        stop = tl.minimum(end, seg_hi)
        b = s // Hkv
        h = s - b * Hkv
        L = _pick(lens_v, ob, b)
        n_lo = (g - seg_lo) * BLOCK_N
        n_hi = tl.minimum((stop - seg_lo) * BLOCK_N, L)
        b64 = b.to(tl.int64)
        h64 = h.to(tl.int64)

        if ALIGNED:
            q = q_own
        else:
            q = _load_q(Q, b, h, gi, sq, dd, row_ok, d_ok, sqb, sqs, sqh, sqd, G)
        k_base = K + b64 * skb + h64 * skh
        v_base = V + b64 * svb + h64 * svh
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        lim = L - SQ + sq                 # bottom-right causal: key n visible to row iff n <= lim
        # 64-bit tile pointers, advanced by BLOCK_N keys per step (no int32 overflow at 1M+ keys)
        kp = k_base + n_lo.to(tl.int64) * sks + offs_n[None, :] * sks + dd[:, None] * skd
        vp = v_base + n_lo.to(tl.int64) * svs + offs_n[:, None] * svs + dd[None, :] * svd
        row0 = (b * Hkv + h) * SK         # descriptor row of key 0 of segment s
        for n0 in range(n_lo, n_hi, BLOCK_N):
            n = n0 + offs_n
            n_ok = n < n_hi
            if TMA:
                kt = tl.trans(KD.load([row0 + n0, 0]))                            # (BLOCK_D, BLOCK_N)
            elif EVEN_D:
                kt = tl.load(kp, mask=n_ok[None, :], other=0.0)                   # (BLOCK_D, BLOCK_N)
            else:
                kt = tl.load(kp, mask=d_ok[:, None] & n_ok[None, :], other=0.0)
            if UPCAST_DOT:  # interpreter: its tl.dot multiplies bf16 bit patterns (stored as uint16)
                qk = tl.dot(q.to(tl.float32), kt.to(tl.float32), input_precision="ieee")
            else:
                qk = tl.dot(q, kt, input_precision=DOT_PREC)
            qk = qk * qk_scale                                                    # base-2 scores
            valid = n_ok[None, :]
            if CAUSAL:
                valid = valid & (n[None, :] <= lim[:, None])
            qk = tl.where(valid, qk, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.math.exp2(m_i - m_use)
            p = tl.math.exp2(qk - m_use[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            if TMA:   # keys past n_hi are the next segment's (finite or not): zero them
                vt = VD.load([row0 + n0, 0])                                      # (BLOCK_N, BLOCK_D)
                vt = tl.where(n_ok[:, None], vt, tl.zeros_like(vt))
            elif EVEN_D:
                vt = tl.load(vp, mask=n_ok[:, None], other=0.0)                   # (BLOCK_N, BLOCK_D)
            else:
                vt = tl.load(vp, mask=n_ok[:, None] & d_ok[None, :], other=0.0)
            if UPCAST_DOT:  # same rounding of p as on the GPU, fp32 product
                pv = tl.dot(p.to(vt.dtype).to(tl.float32), vt.to(tl.float32), input_precision="ieee")
            else:
                pv = tl.dot(p.to(vt.dtype), vt, input_precision=DOT_PREC)
            acc = acc * alpha[:, None] + pv
            m_i = m_new
            kp += BLOCK_N * sks
            vp += BLOCK_N * svs

        ok = l_i > 0
        l_safe = tl.where(ok, l_i, 1.0)
        o = acc / l_safe[:, None]
        lse2 = tl.where(ok, m_i + tl.log2(l_safe), float("-inf"))
        if FUSED:
            if (seg_lo >= start) & (seg_hi <= end):   # the whole segment is ours: final state
                _store_final(OUT, LSE, o, lse2, b, h, gi, sq, dd, row_ok, d_ok,
                             sob, sos, soh, sod, slb, slh, sls, G)
            else:
                _store_piece(PO, PL, c + s, o, lse2, rows, dd, row_ok, d_ok, R, D)
                tl.debug_barrier()        # all threads' partial stores precede the release
                arrived = tl.atomic_add(CNT + s, 1, sem="acq_rel", scope="gpu")
                c0, npieces = _pieces_of(s, seg_lo, seg_hi, T, P, PPS, ALIGNED)
                if arrived == npieces - 1:  # the last piece of this segment to arrive merges
                    tl.debug_barrier()
                    mrows = tl.arange(0, MROWS)    # only the real rows: more pieces per load
                    mrow_ok = mrows < R
                    mo, ml = _merge_pieces(PO, PL, c0 + s, npieces, mrows, dd, mrow_ok, d_ok, R, D,
                                           MROWS, BLOCK_D, MCHUNK)
                    _store_final(OUT, LSE, mo, ml, b, h, mrows // SQ, mrows % SQ, dd, mrow_ok, d_ok,
                                 sob, sos, soh, sod, slb, slh, sls, G)
                    tl.atomic_xchg(CNT + s, 0)
        else:
            _store_piece(PO, PL, c + s, o, lse2, rows, dd, row_ok, d_ok, R, D)
        g = stop
        s += 1


@triton.jit
def _lean_merge(PO, PL, OUT, LSE, LENS, sob, sos, soh, sod, slb, slh, sls, P, PPS, S, Hkv, B, SK,
                G: tl.constexpr, SQ: tl.constexpr, D: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_B: tl.constexpr, CHUNK: tl.constexpr, UNIFORM: tl.constexpr, ALIGNED: tl.constexpr,
                PDL: tl.constexpr):
    """Second pass: program (s, j) merges the pieces of segment s = b*Hkv + h over head-dim block j
    (BLOCK_D columns; several programs per segment, so every piece is loaded in one round).
    ALIGNED: the pieces are the P/S slots from s*(P/S) + s, every one written (empty programs
    store an empty state), so the lengths are not read. PDL: launched as a programmatic
    dependent of the main pass; the pieces are read after ``gdc_wait``."""
    s = tl.program_id(0)
    j = tl.program_id(1)
    R = G * SQ
    if ALIGNED:
        c0 = s * PPS
        npieces = PPS
    else:
        ob = tl.arange(0, BLOCK_B)
        _, tiles_v, excl_v = _lens_plan(LENS, B, SK, BLOCK_B, BLOCK_N, UNIFORM)
        T = Hkv * tl.sum(tiles_v, 0)
        lo = _seg_start(s, tiles_v, excl_v, ob, Hkv, S, T)
        hi = _seg_start(s + 1, tiles_v, excl_v, ob, Hkv, S, T)
        c0, npieces = _pieces_of(s, lo, hi, T, P, PPS, ALIGNED)
    if PDL:
        tl.extra.cuda.gdc_wait()
    rows = tl.arange(0, BLOCK_M)
    dd = j * BLOCK_D + tl.arange(0, BLOCK_D)
    row_ok = rows < R
    d_ok = dd < D
    o, lse2 = _merge_pieces(PO, PL, c0 + s, npieces, rows, dd, row_ok, d_ok, R, D, BLOCK_M, BLOCK_D, CHUNK)
    b = s // Hkv
    _store_final(OUT, LSE, o, lse2, b, s - b * Hkv, rows // SQ, rows % SQ, dd, row_ok, d_ok,
                 sob, sos, soh, sod, slb, slh, sls, G, j == 0)


# ------------------------------------------------------------------------------------------------
# host side

_LENS: OrderedDict = OrderedDict()
_LENS_CACHE_SIZE = 64
_COUNTERS: dict = {}


# Tile and grid choice on CUDA: per split, rows (max B*Sk, programs per SM, block_n, num_warps,
# num_stages); the first row with B*Sk <= max applies (d <= 64 takes block_n >= 128). From the lean
# section of benchmarks/decode_step.py on one H200 (bf16, Hq 32 / Hkv 8, d 128, L2 flushed):
# stream-K (2026-12-02, three runs): 1 program/SM x 64 keys best or within 2% at 4K-16K, 2/SM x 64
# keys x 4 stages at 32K-1M and for a B = 8 ragged batch; aligned (2026-12-03, 17 configurations):
# 1/SM x 64 keys x 4 stages best or within 0.5% of the best at every B = 1 context 4K-1M (3 stages
# cost 2 us at 16K, 2/SM x 64 x 4 stages 4% at 16K). The choice depends on the capacity, not the
# lengths, so a graph over a growing cache keeps one.
TUNED = {"stream_k": ((24576, 1, 64, 4, 3), (1 << 62, 2, 64, 4, 4)),
         "aligned": ((1 << 62, 1, 64, 4, 4),)}


def default_config(head_dim: int, dtype: torch.dtype, n_keys: int | None = None,
                   split: str = "stream_k") -> dict:
    """Tile configuration and programs per SM for a KV capacity of ``n_keys`` = B*Sk (``TUNED``)."""
    table = TUNED[split]
    row = table[-1] if n_keys is None else next(r for r in table if n_keys <= r[0])
    block_n = row[2] if head_dim > 64 else max(row[2], 128)
    return {"block_n": block_n, "num_warps": row[3], "num_stages": row[4], "programs_per_sm": row[1]}


def default_num_programs(device: torch.device, programs_per_sm: int = 2) -> int:
    """``programs_per_sm`` programs per SM on CUDA; a handful under the CPU interpreter."""
    if device.type == "cuda":
        return programs_per_sm * torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def schedule(lengths: tuple[int, ...], Hkv: int, block_n: int, P: int, aligned: bool = False):
    """Host mirror of the in-kernel schedule (tests, planning): (seg_start (S+1) list, the unit
    range [start, end) of each program (P) list, T). ``aligned`` (P a multiple of S): program c
    splits segment c // (P / S) with its neighbours (``_range_of``). The kernels compute the same
    figures on the device."""
    seg = [0]
    for n in lengths:
        tiles = -(-n // block_n)
        for _ in range(Hkv):
            seg.append(seg[-1] + tiles)
    T = seg[-1]
    S = len(seg) - 1
    ranges = []
    for c in range(P):
        if aligned:
            pps = P // S
            s, j = divmod(c, pps)
            nt = seg[s + 1] - seg[s]
            st = seg[s] + j * (nt // pps) + min(j, nt % pps)
            ranges.append((st, st + nt // pps + (j < nt % pps)))
        else:
            base, rem = divmod(T, P)
            st = c * base + min(c, rem)
            ranges.append((st, st + base + (c < rem)))
    return seg, ranges, T


def same_lengths(lengths, B: int) -> bool:
    """Whether every sequence has the same length: B = 1, ``None`` (all Sk keys) or equal host
    lengths (a device tensor at B > 1 is not known to be)."""
    return B == 1 or lengths is None or (not isinstance(lengths, torch.Tensor) and len(set(lengths)) == 1)


def choose_split(split: str | None, same: bool, S: int, P: int, p_given: bool) -> tuple[str, int]:
    """The schedule and grid: ("stream_k" | "aligned", P). ``None`` picks "aligned" when every
    sequence has the same length (``same``, :func:`same_lengths`) and P >= S: then no program
    straddles two segments (each straddle restarts a program's load pipeline and puts two Q loads
    on the critical path). A default grid is rounded down to a multiple of S (at B = 1, Hkv = 8:
    128 of 132 programs, the same largest piece for power-of-two lengths); a given grid is kept,
    so None aligns it only when S divides it."""
    if split not in (None, "stream_k", "aligned"):
        raise ValueError(f"split must be 'stream_k', 'aligned' or None, got {split!r}")
    if split == "stream_k":
        return split, P
    if split is None and (not same or P < S or (p_given and P % S)):
        return "stream_k", P
    if P < S:
        raise ValueError(f"split='aligned' needs num_programs >= B*Hkv = {S}, got {P}")
    return "aligned", S * (P // S)


def _merge_chunk(block_m: int, block_d: int) -> int:
    """Pieces merged per load (a (CHUNK, BLOCK_M, BLOCK_D) fp32 block of about 8K values; smaller
    blocks in the fused reduction measured slower: more serial L2 round trips, 2026-12-03)."""
    return max(1, min(64, 8192 // (block_m * block_d)))


MERGE_BLOCK_D = 32      # head-dim columns per merge program (d = 128: 4 programs per segment)


def _lens_tensor(lengths: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """Cached int32 device copy of host lengths (a repeated call copies nothing: graph capturable)."""
    key = (lengths, str(device))
    hit = _LENS.get(key)
    if hit is not None:
        _LENS.move_to_end(key)
        return hit
    t = torch.tensor(lengths, dtype=torch.int32).to(device)
    _LENS[key] = t
    if len(_LENS) > _LENS_CACHE_SIZE:
        _LENS.popitem(last=False)
    return t


def _counters(S: int, device: torch.device) -> torch.Tensor:
    """Zeroed int32 arrival counters for the fused reduction, one cached buffer per device.

    The last-arriving program of each segment resets its counter, so the buffer is zero again
    after every launch (and a CUDA-graph replay needs no memset). Two fused launches running
    concurrently on different streams of one device would share it: don't do that."""
    key = str(device)
    buf = _COUNTERS.get(key)
    if buf is None or buf.numel() < S:
        buf = torch.zeros(max(S, 4096), dtype=torch.int32, device=device)
        _COUNTERS[key] = buf
    return buf


def interpreter_shim() -> None:
    """Work around triton#9171 (fixed upstream by PR #9172, not in triton 3.6.0): with numpy >= 2.4
    the interpreter's ``tensor.__index__`` does ``int(array_of_shape_(1,))``, which now raises, so
    any ``range()`` with run-time bounds fails under TRITON_INTERPRET=1. Re-register ``__index__``
    with the upstream fix. Only touches the interpreter, only when the bug is present."""
    global _SHIM_DONE
    if _SHIM_DONE:
        return
    _SHIM_DONE = True
    try:
        int(np.zeros(1, dtype=np.int32))
        return                                        # numpy < 2.4: nothing to fix
    except TypeError:
        pass
    from triton.runtime import interpreter as ti
    orig = getattr(ti, "_patch_lang_tensor", None)
    if orig is None or getattr(orig, "_hpcattn_shim", False):
        return

    def patched(tensor, scope):
        orig(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patched._hpcattn_shim = True
    ti._patch_lang_tensor = patched


_SHIM_DONE = False


def _tma_ok(k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether K/V tiles can come through (B*Hkv*Sk, d) TMA descriptors: head-major contiguous
    k and v (``kernels.head_major``), d a power of two with 16-byte rows, fewer than 2**31 rows."""
    B, Sk, Hkv, d = k.shape
    ok = all(t.transpose(1, 2).is_contiguous() and t.data_ptr() % 16 == 0 for t in (k, v))
    return ok and d & (d - 1) == 0 and d * k.element_size() % 16 == 0 and 0 < B * Hkv * Sk < 2 ** 31


# The merge pass as a programmatic dependent of the main pass (Hopper+): launched while the main
# pass runs, it waits in gdc_wait, so its launch latency is hidden. One H200, 2026-12-03, graph
# replays, aligned split: 0.966 -> 0.985x cuDNN at 4K, 0.996 -> 1.014x at 16K, equal at 1M.
PDL_DEFAULT = True
TMA_DEFAULT = False     # automatic TMA loads on Hopper+ where _tma_ok allows (measured slower: off)


def _check_args(q, k, v, scale, k_lengths, causal, reduction):
    """Argument validation (pure torch / Python); returns the per-sequence lengths tuple."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be 4-D (B, S, H, d); got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    B, Sq, Hq, d = q.shape
    if k.shape != v.shape:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} differ")
    if k.shape[0] != B or k.shape[3] != d:
        raise ValueError(f"k/v {tuple(k.shape)} do not match q {tuple(q.shape)} in batch or head_dim")
    Hkv = k.shape[2]
    if Hkv == 0 or Hq % Hkv:
        raise ValueError(f"Hq={Hq} is not a multiple of Hkv={Hkv}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"dtypes differ: q {q.dtype}, k {k.dtype}, v {v.dtype}")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"lean_decode supports fp16/bf16/fp32, got {q.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"devices differ: q {q.device}, k {k.device}, v {v.device}")
    if q.device.type != "cuda":
        if os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError("lean_decode needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors)")
        interpreter_shim()
    if d > MAX_HEAD_DIM:
        raise ValueError(f"head_dim {d} > {MAX_HEAD_DIM}")
    if (Hq // Hkv) * Sq > MAX_ROWS:
        raise ValueError(f"G*Sq = {(Hq // Hkv) * Sq} > {MAX_ROWS}: lean_decode is a decode kernel "
                         "(use a prefill kernel for long query blocks)")
    if causal not in ("none", "bottom_right"):
        raise ValueError(f"causal must be 'none' or 'bottom_right', got {causal!r}")
    if reduction not in ("two_kernel", "fused"):
        raise ValueError(f"reduction must be 'two_kernel' or 'fused', got {reduction!r}")
    if not (isinstance(scale, (int, float)) and math.isfinite(scale)):
        raise ValueError(f"scale must be a finite float, got {scale!r}")
    Sk = k.shape[1]
    if k_lengths is None:
        return (Sk,) * B
    if isinstance(k_lengths, torch.Tensor):     # device lengths: read by the kernels, never synced
        if k_lengths.shape != (B,) or k_lengths.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"k_lengths tensor must be (B={B},) int32/int64, got "
                             f"{tuple(k_lengths.shape)} {k_lengths.dtype}")
        if k_lengths.device != q.device:
            raise ValueError(f"k_lengths is on {k_lengths.device}, q on {q.device}")
        return k_lengths
    lengths = tuple(int(n) for n in k_lengths)
    if len(lengths) != B:
        raise ValueError(f"k_lengths has {len(lengths)} entries for batch {B}")
    if any(n < 0 or n > Sk for n in lengths):
        raise ValueError(f"k_lengths must lie in [0, Sk={Sk}], got {list(lengths)}")
    return lengths


def lean_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float,
                k_lengths: list[int] | None = None, num_programs: int | None = None,
                causal: str = "none", reduction: str = "two_kernel", block_n: int | None = None,
                num_warps: int | None = None, num_stages: int | None = None, tma: bool | None = None,
                split: str | None = None, pdl: bool | None = None):
    """Stream-K decode attention state of q over (k, v); see the module docstring.

    Args:
        q: (B, Sq, Hq, d) fp16/bf16 (fp32 allowed), any strides; G*Sq <= 128 with G = Hq/Hkv.
        k, v: (B, Sk, Hkv, d), same dtype/device, any strides (head-major storage is fastest).
        scale: softmax scale tau (included in lse).
        k_lengths: optional (B,) ints in [0, Sk]: sequence b sees keys [0, k_lengths[b]); keys
            past a length are never read. None means every sequence sees all Sk keys. A (B,)
            int32/int64 tensor on q's device is read by the kernels without a host sync (CUDA
            graphs); its values are clamped to [0, Sk], not checked.
        num_programs: grid size P of the stream-K pass (default: 2 x SMs, capped at the number
            of work units for host lengths); any P >= 1 is valid.
        causal: ``none``, or ``bottom_right`` (row i of Sq sees keys j <= len - Sq + i; for
            speculative verification).
        reduction: ``two_kernel`` (second Triton pass) or ``fused`` (last-arriving program
            merges; one launch); see the module docstring.
        block_n, num_warps, num_stages: tile configuration (default :func:`default_config`).
        tma: load K/V tiles with TMA tensor descriptors (Hopper+, head-major contiguous caches);
            None = ``TMA_DEFAULT`` on Hopper+ where :func:`_tma_ok` allows.
        split: ``stream_k`` (the balanced split of all tiles, any lengths), ``aligned`` (each
            segment split over P / S programs; P rounded down to a multiple of S) or None
            (:func:`choose_split`: aligned for equal lengths).
        pdl: launch the merge pass as a programmatic dependent of the main pass (Hopper+, two-kernel
            reduction; ignored elsewhere); None = ``PDL_DEFAULT``.

    Returns:
        out (B, Sq, Hq, d) in q.dtype and lse (B, Hq, Sq) float32 (natural log); a row that sees
        no key gets (0, -inf).
    """
    lengths = _check_args(q, k, v, scale, k_lengths, causal, reduction)
    B, Sq, Hq, d = q.shape
    Hkv = k.shape[2]
    G = Hq // Hkv
    out = torch.empty(B, Sq, Hq, d, dtype=q.dtype, device=q.device)
    lse = torch.empty(B, Hq, Sq, dtype=torch.float32, device=q.device)
    if B == 0 or Sq == 0:
        return out, lse
    uniform = k_lengths is None                    # every sequence sees all Sk keys: nothing to copy
    same = same_lengths(None if uniform else lengths, B)
    want_aligned = split == "aligned" or (split is None and same)
    cfg = default_config(d, q.dtype, B * k.shape[1], "aligned" if want_aligned else "stream_k")
    block_n = block_n or cfg["block_n"]
    num_warps = num_warps or cfg["num_warps"]
    num_stages = num_stages or cfg["num_stages"]
    if block_n < 16 or block_n & (block_n - 1):
        raise ValueError(f"block_n must be a power of two >= 16, got {block_n}")
    S = B * Hkv
    device_lengths = isinstance(lengths, torch.Tensor)
    p_given = num_programs is not None
    if num_programs is None:
        num_programs = default_num_programs(q.device, cfg["programs_per_sm"])
    P = int(num_programs)
    if P < 1:
        raise ValueError(f"num_programs must be >= 1, got {num_programs}")
    split, P = choose_split(split, same, S, P, p_given)
    if not p_given and not device_lengths:          # no more programs than work units
        tiles = [-(-n // block_n) for n in lengths]
        P = S * max(1, min(P // S, max(tiles))) if split == "aligned" else max(1, min(P, Hkv * sum(tiles)))
    aligned = split == "aligned"
    pps = P // S if aligned else P                  # programs per segment (stream-K: unused)
    lens = lengths if device_lengths else (q if uniform else _lens_tensor(lengths, q.device))

    R = G * Sq
    BLOCK_M = max(16, triton.next_power_of_2(R))
    BLOCK_D = max(16, triton.next_power_of_2(d))
    BLOCK_B = max(2, triton.next_power_of_2(B))
    Sk = k.shape[1]
    part_o = torch.empty(S + P, R, d, dtype=torch.float32, device=q.device)
    part_l = torch.empty(S + P, R, dtype=torch.float32, device=q.device)
    fused = reduction == "fused"
    cnt = _counters(S, q.device) if fused else lens      # CNT unused by the two-kernel path
    dot_prec = "ieee" if q.dtype == torch.float32 else "tf32"
    rows = max(2, triton.next_power_of_2(R))               # merges: no tl.dot, no 16-row minimum
    hopper = q.device.type == "cuda" and torch.cuda.get_device_capability(q.device)[0] >= 9
    pdl = (PDL_DEFAULT if pdl is None else bool(pdl)) and not fused and hopper
    use_tma = (TMA_DEFAULT and hopper and _tma_ok(k, v)) if tma is None else bool(tma)
    if use_tma:
        if not _tma_ok(k, v):
            raise ValueError("tma=True needs head-major contiguous k and v (kernels.head_major), "
                             f"16-byte rows and B*Hkv*Sk < 2**31; got k strides {k.stride()}")
        from triton.tools.tensor_descriptor import TensorDescriptor
        rows_kv = B * Hkv * k.shape[1]
        kd, vd = (TensorDescriptor(t.transpose(1, 2), [rows_kv, d], [d, 1], [block_n, d]) for t in (k, v))
    else:
        kd, vd = k, v
    _lean_fwd[(P,)](
        q, k, v, kd, vd, part_o, part_l, out, lse, lens, cnt,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(), *lse.stride(),
        float(scale) * LOG2E, P, pps, S, Hkv, B, Sk,
        G=G, SQ=Sq, D=d, BLOCK_M=BLOCK_M, BLOCK_N=block_n, BLOCK_D=BLOCK_D, BLOCK_B=BLOCK_B,
        CAUSAL=causal == "bottom_right", FUSED=fused, ALIGNED=aligned, DOT_PREC=dot_prec,
        UPCAST_DOT=q.device.type != "cuda",
        EVEN_D=BLOCK_D == d, MROWS=rows, MCHUNK=_merge_chunk(rows, BLOCK_D), UNIFORM=uniform,
        TMA=use_tma, PDL=pdl, num_warps=num_warps, num_stages=num_stages)
    if not fused:
        mbd = min(BLOCK_D, MERGE_BLOCK_D)
        _lean_merge[(S, triton.cdiv(d, mbd))](
            part_o, part_l, out, lse, lens, *out.stride(), *lse.stride(), P, pps, S, Hkv, B, Sk,
            G=G, SQ=Sq, D=d, BLOCK_M=rows, BLOCK_D=mbd, BLOCK_N=block_n, BLOCK_B=BLOCK_B,
            CHUNK=_merge_chunk(rows, mbd), UNIFORM=uniform, ALIGNED=aligned, PDL=pdl, num_warps=4,
            **({"launch_pdl": True} if pdl else {}))
    return out, lse
