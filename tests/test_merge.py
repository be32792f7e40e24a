"""Merging partial attention states (spec README sections 2, 3, 4, 6), in float64.

Ground truth is :func:`attn_reference` on the unsplit key set; partial states are the reference on
each chunk of keys. Every merge must reproduce the unsplit state, in any order, with empty chunks,
fully-masked rows and large LSE magnitudes, and never produce NaN.
"""

from __future__ import annotations

import random

import pytest
import torch

from hpcattn.kernels import (attn_reference, empty_state, lse_as_out, merge_pair, merge_states,
                             pack_states, sanitize_lse, unpack_states)
from hpcattn.kernels.merge import normalize_sum

F64 = torch.float64
ATOL = 1e-12


def qkv(B, Sq, Sk, H, d, seed=0, Hkv=None):
    g = torch.Generator().manual_seed(seed)
    Hkv = Hkv or H
    return (torch.randn(B, Sq, H, d, generator=g, dtype=F64),
            torch.randn(B, Sk, Hkv, d, generator=g, dtype=F64),
            torch.randn(B, Sk, Hkv, d, generator=g, dtype=F64))


def random_cuts(Sk: int, R: int, rng: random.Random) -> list[tuple[int, int]]:
    """R contiguous chunks covering [0, Sk); duplicate cut points make empty chunks."""
    cuts = sorted(rng.randint(0, Sk) for _ in range(R - 1))
    bounds = [0] + cuts + [Sk]
    return [(bounds[i], bounds[i + 1]) for i in range(R)]


def chunk_states(q, k, v, chunks, *, scale, mask=None):
    """Reference state of q over each key chunk (a chunk may be empty)."""
    states = []
    for a, b in chunks:
        m = None if mask is None else mask[..., a:b]
        states.append(attn_reference(q, k[:, a:b], v[:, a:b], scale=scale, mask=m))
    return states


def assert_no_nan(*ts):
    for t in ts:
        assert not torch.isnan(t).any(), "NaN in merge result"


def assert_state_close(out, lse, ref_out, ref_lse, atol=ATOL):
    assert out.shape == ref_out.shape and lse.shape == ref_lse.shape
    assert_no_nan(out, lse)
    torch.testing.assert_close(out, ref_out, rtol=0, atol=atol)
    # -inf positions must agree exactly; finite ones numerically
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse))
    fin = torch.isfinite(ref_lse)
    torch.testing.assert_close(lse[fin], ref_lse[fin], rtol=0, atol=atol)


def fold(states, start=None):
    acc = start
    for o, l in states:
        acc = (o, l) if acc is None else merge_pair(acc[0], acc[1], o, l)
    return acc


# ------------------------------------------------------------------------------------------------
# splitting and merging equals the unsplit reference


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("R", [1, 2, 5, 9])
def test_random_split_merge_equals_unsplit(seed, R):
    rng = random.Random(1000 * R + seed)
    B, Sq, H, d, Sk = rng.choice([1, 3]), rng.choice([1, 4]), 2, 8, rng.choice([5, 23, 64])
    q, k, v = qkv(B, Sq, Sk, H, d, seed=seed)
    scale = d ** -0.5
    ref_out, ref_lse = attn_reference(q, k, v, scale=scale)
    chunks = random_cuts(Sk, R, rng)
    states = chunk_states(q, k, v, chunks, scale=scale)
    rng.shuffle(states)                                   # commutativity

    # all at once
    out, lse = merge_states(torch.stack([s[0] for s in states]), torch.stack([s[1] for s in states]))
    assert out.dtype == F64 and lse.dtype == F64
    assert_state_close(out, lse, ref_out, ref_lse)

    # pairwise fold, from the first state and from the empty state
    po, pl = fold(states)
    assert_state_close(po, pl, ref_out, ref_lse)
    eo, el = empty_state(B, Sq, H, d, dtype=F64, device="cpu")
    po2, pl2 = fold(states, start=(eo, el))
    assert_state_close(po2, pl2, ref_out, ref_lse)


@pytest.mark.parametrize("seed", range(4))
def test_pairwise_tree_order_associativity(seed):
    """((a+b)+(c+d)) == (((a+b)+c)+d) == merge_states: any tree works."""
    rng = random.Random(seed)
    q, k, v = qkv(2, 3, 40, 4, 16, seed=seed)
    states = chunk_states(q, k, v, random_cuts(40, 4, rng), scale=0.25)
    a, b, c, d_ = states
    ab = merge_pair(*a, *b)
    cd = merge_pair(*c, *d_)
    tree = merge_pair(*ab, *cd)
    chain = merge_pair(*merge_pair(*ab, *c), *d_)
    rev = fold(states[::-1])
    ref = attn_reference(q, k, v, scale=0.25)
    for o, l in (tree, chain, rev):
        assert_state_close(o, l, *ref)


def test_gqa_split_merge():
    q, k, v = qkv(2, 5, 30, 8, 16, seed=4, Hkv=2)
    ref = attn_reference(q, k, v, scale=0.2)
    states = chunk_states(q, k, v, [(0, 7), (7, 7), (7, 30)], scale=0.2)
    out, lse = merge_states(torch.stack([s[0] for s in states]), torch.stack([s[1] for s in states]))
    assert_state_close(out, lse, *ref)


# ------------------------------------------------------------------------------------------------
# empty chunks, fully-masked rows, all-empty


def test_empty_chunks_and_fully_masked_rows_no_nan():
    B, Sq, H, d, Sk = 3, 6, 2, 8, 20
    q, k, v = qkv(B, Sq, Sk, H, d, seed=7)
    g = torch.Generator().manual_seed(3)
    mask = torch.rand(B, H, Sq, Sk, generator=g) < 0.5
    mask[0, :, 2] = False                    # row 2 of batch 0 sees no key at all
    mask[2, 1] = False                       # head 1 of batch 2: every row empty
    mask[1, :, :, :10] = False               # batch 1 sees nothing in the first chunks
    ref_out, ref_lse = attn_reference(q, k, v, scale=0.3, mask=mask)
    assert torch.isneginf(ref_lse[0, :, 2]).all() and torch.isneginf(ref_lse[2, 1]).all()

    chunks = [(0, 0), (0, 5), (5, 10), (10, 10), (10, 20), (20, 20)]
    states = chunk_states(q, k, v, chunks, scale=0.3, mask=mask)
    for o, l in states:
        assert_no_nan(o, l)
    outs, lses = torch.stack([s[0] for s in states]), torch.stack([s[1] for s in states])
    out, lse = merge_states(outs, lses)
    assert_state_close(out, lse, ref_out, ref_lse)
    assert torch.equal(out[0, 2], torch.zeros_like(out[0, 2]))
    assert torch.equal(out[2, :, 1], torch.zeros_like(out[2, :, 1]))

    for order in (states, states[::-1], states[2:] + states[:2]):
        po, pl = fold(order)
        assert_state_close(po, pl, ref_out, ref_lse)


def test_all_empty_gives_empty_state():
    B, Sq, H, d, R = 3, 2, 4, 8, 5
    eo, el = empty_state(B, Sq, H, d, dtype=F64, device="cpu")
    assert torch.equal(eo, torch.zeros(B, Sq, H, d, dtype=F64))
    assert el.shape == (B, H, Sq) and torch.isneginf(el).all()
    out, lse = merge_states(eo.expand(R, *eo.shape).clone(), el.expand(R, *el.shape).clone())
    assert_no_nan(out, lse)
    assert torch.equal(out, torch.zeros_like(out)) and torch.isneginf(lse).all()
    po, pl = merge_pair(eo, el, eo, el)
    assert_no_nan(po, pl)
    assert torch.equal(po, torch.zeros_like(po)) and torch.isneginf(pl).all()


def test_merge_with_empty_is_identity():
    q, k, v = qkv(2, 3, 9, 2, 8, seed=2)
    o, l = attn_reference(q, k, v, scale=0.5)
    eo, el = empty_state(2, 3, 2, 8, dtype=F64, device="cpu")
    for a, b in (((o, l), (eo, el)), ((eo, el), (o, l))):
        mo, ml = merge_pair(*a, *b)
        assert torch.equal(mo, o) and torch.equal(ml, l)
    mo, ml = merge_states(torch.stack([eo, o, eo]), torch.stack([el.double(), l, el.double()]))
    torch.testing.assert_close(mo, o, rtol=0, atol=ATOL)
    torch.testing.assert_close(ml, l, rtol=0, atol=ATOL)


def test_zero_length_key_chunk_reference_is_empty_state():
    q, k, v = qkv(2, 3, 0, 2, 8)
    o, l = attn_reference(q, k, v, scale=1.0)
    assert torch.equal(o, torch.zeros_like(o)) and torch.isneginf(l).all()


def test_sanitize_lse_maps_posinf_and_nan_to_neginf():
    x = torch.tensor([1.5, float("inf"), float("nan"), float("-inf"), -3.0])
    y = sanitize_lse(x)
    assert torch.equal(y[[0, 4]], x[[0, 4]])
    assert torch.isneginf(y[1:4]).all()


# ------------------------------------------------------------------------------------------------
# packing and the all-reduce form


@pytest.mark.parametrize("B,Sq,H,d", [(1, 1, 1, 4), (3, 1, 8, 16), (2, 5, 4, 8)])
def test_pack_unpack_round_trip(B, Sq, H, d):
    g = torch.Generator().manual_seed(B * 100 + Sq)
    out = torch.randn(B, Sq, H, d, generator=g, dtype=F64)
    lse = torch.randn(B, H, Sq, generator=g, dtype=F64)
    lse[0, 0, 0] = float("-inf")
    buf = pack_states(out, lse)
    assert buf.shape == (B * H * Sq, d + 1) and buf.is_contiguous()
    # row order is (B, H, Sq): the last column is lse flattened
    assert torch.equal(buf[:, d], lse.reshape(-1))
    o2, l2 = unpack_states(buf, B, Sq, H, d)
    assert torch.equal(o2, out) and torch.equal(l2, lse)

    # leading dims: a stack of R packed buffers unpacks to (R, ...) states
    R = 3
    outs = torch.randn(R, B, Sq, H, d, generator=g, dtype=F64)
    lses = torch.randn(R, B, H, Sq, generator=g, dtype=F64)
    stacked = torch.stack([pack_states(outs[r], lses[r]) for r in range(R)])
    o3, l3 = unpack_states(stacked, B, Sq, H, d)
    assert o3.shape == outs.shape and l3.shape == lses.shape
    assert torch.equal(o3, outs) and torch.equal(l3, lses)


def test_pack_with_weight():
    g = torch.Generator().manual_seed(0)
    B, Sq, H, d = 2, 3, 4, 5
    out = torch.randn(B, Sq, H, d, generator=g, dtype=F64)
    w = torch.rand(B, H, Sq, generator=g, dtype=F64)
    buf = pack_states(out, torch.zeros_like(w), weight=w)
    num, den = unpack_states(buf, B, Sq, H, d)
    torch.testing.assert_close(num, out * lse_as_out(w), rtol=0, atol=0)
    assert torch.equal(den, w)


@pytest.mark.parametrize("seed", range(3))
def test_normalize_sum_reproduces_merge_states(seed):
    """All-reduce form: MAX of lse, then SUM of packed [w*out | w], then normalize."""
    rng = random.Random(seed)
    B, Sq, H, d, Sk, R = 3, 2, 4, 8, 30, 5
    q, k, v = qkv(B, Sq, Sk, H, d, seed=seed)
    mask = torch.ones(B, H, Sq, Sk, dtype=torch.bool)
    mask[1, 2, 0] = False                                  # a fully-masked row
    states = chunk_states(q, k, v, random_cuts(Sk, R, rng) + [(Sk, Sk)], scale=0.3, mask=mask)
    outs = torch.stack([s[0] for s in states])
    lses = torch.stack([s[1] for s in states])

    m = lses.amax(dim=0)                                   # Allreduce(MAX)
    m_safe = torch.where(torch.isneginf(m), torch.zeros_like(m), m)
    packed = torch.stack([pack_states(outs[r], lses[r], weight=torch.exp(lses[r] - m_safe))
                          for r in range(len(states))])
    num_den = packed.sum(dim=0)                            # Allreduce(SUM)
    out, lse = normalize_sum(num_den, m_safe, B, Sq, H, d)

    mo, ml = merge_states(outs, lses)
    assert_state_close(out, lse, mo, ml, atol=1e-13)
    assert_state_close(out, lse, *attn_reference(q, k, v, scale=0.3, mask=mask))
    assert torch.isneginf(lse[1, 2, 0]) and torch.equal(out[1, 0, 2], torch.zeros(d, dtype=F64))


# ------------------------------------------------------------------------------------------------
# batch > 1 (the public tree-decode broadcast bug) and layouts


def test_lse_as_out_layout():
    B, H, Sq = 3, 4, 2
    lse = torch.arange(B * H * Sq, dtype=F64).view(B, H, Sq)
    x = lse_as_out(lse)
    assert x.shape == (B, Sq, H, 1)
    for b in range(B):
        for h in range(H):
            for s in range(Sq):
                assert x[b, s, h, 0] == lse[b, h, s]


@pytest.mark.parametrize("Sq,H", [(1, 1), (1, 4), (3, 3), (2, 5)])
def test_batch_gt_1_matches_per_batch_reference(Sq, H):
    """B=3 with very different data per batch element (incl. Sq == H, where a transposed
    broadcast would silently run): each batch element merges to its own reference."""
    B, d, Sk = 3, 8, 24
    q, k, v = qkv(B, Sq, Sk, H, d, seed=Sq * 10 + H)
    q[1] *= 4.0                                            # different lse ranges per batch
    k[2] = k[2] * 0.1 + 2.0
    v[0] += 10.0
    scale = 0.5
    chunks = [(0, 5), (5, 5), (5, 17), (17, 24)]
    states = chunk_states(q, k, v, chunks, scale=scale)
    outs, lses = torch.stack([s[0] for s in states]), torch.stack([s[1] for s in states])
    out, lse = merge_states(outs, lses)
    po, pl = fold(states)
    for b in range(B):
        rb = attn_reference(q[b:b + 1], k[b:b + 1], v[b:b + 1], scale=scale)
        assert_state_close(out[b:b + 1], lse[b:b + 1], *rb)
        assert_state_close(po[b:b + 1], pl[b:b + 1], *rb)
        # the batch element merged alone gives the same answer as inside the batch
        so, sl = merge_states(outs[:, b:b + 1], lses[:, b:b + 1])
        torch.testing.assert_close(so, out[b:b + 1], rtol=0, atol=ATOL)


# ------------------------------------------------------------------------------------------------
# magnitude and precision


@pytest.mark.parametrize("offset", [1e4, -1e4, 1e6])
def test_large_lse_offsets_stay_finite(offset):
    g = torch.Generator().manual_seed(1)
    R, B, Sq, H, d = 4, 2, 3, 2, 8
    outs = torch.randn(R, B, Sq, H, d, generator=g, dtype=F64)
    base = torch.randn(R, B, H, Sq, generator=g, dtype=F64)
    lses = base + offset
    # lse - max loses ~|offset| * eps absolutely: the weights carry that relative error
    tol = 1e-12 + 1e-14 * abs(offset)
    out, lse = merge_states(outs, lses)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    # exact answer via softmax weights over R (offset-invariant)
    w = torch.softmax(base, dim=0)
    expect = (outs * w.transpose(2, 3).unsqueeze(-1)).sum(0)
    torch.testing.assert_close(out, expect, rtol=0, atol=tol)
    torch.testing.assert_close(lse - offset, torch.logsumexp(base, 0), rtol=0, atol=tol)
    po, pl = fold([(outs[r], lses[r]) for r in range(R)])
    assert torch.isfinite(po).all() and torch.isfinite(pl).all()
    torch.testing.assert_close(po, expect, rtol=0, atol=tol)
    torch.testing.assert_close(pl - offset, torch.logsumexp(base, 0), rtol=0, atol=tol)


def test_far_apart_lses_do_not_overflow():
    """lse_b - lse = 2000: exp overflows in float64, log(1+exp(.)) would give inf; logaddexp must not."""
    g = torch.Generator().manual_seed(2)
    B, Sq, H, d = 3, 1, 2, 4
    oa, ob = (torch.randn(B, Sq, H, d, generator=g, dtype=F64) for _ in range(2))
    la = torch.zeros(B, H, Sq, dtype=F64)
    lb = torch.full((B, H, Sq), 2000.0, dtype=F64)
    lb[1] = -2000.0                                      # batch 1: a dominates instead
    for (o, l) in (merge_pair(oa, la, ob, lb), merge_pair(ob, lb, oa, la),
                   merge_states(torch.stack([oa, ob]), torch.stack([la, lb]))):
        assert torch.isfinite(o).all() and torch.isfinite(l).all()
        torch.testing.assert_close(o[[0, 2]], ob[[0, 2]], rtol=0, atol=1e-12)
        torch.testing.assert_close(o[1], oa[1], rtol=0, atol=1e-12)
        torch.testing.assert_close(l[[0, 2]], lb[[0, 2]], rtol=0, atol=1e-12)
        torch.testing.assert_close(l[1], la[1], rtol=0, atol=1e-12)


def test_accumulation_dtype():
    """bf16/fp32 partials accumulate in float32; any float64 input makes it float64."""
    B, Sq, H, d = 1, 2, 2, 4
    o16 = torch.randn(2, B, Sq, H, d).to(torch.bfloat16)
    l32 = torch.randn(2, B, H, Sq)
    out, lse = merge_states(o16, l32)
    assert out.dtype == torch.float32 and lse.dtype == torch.float32
    out, lse = merge_pair(o16[0], l32[0], o16[1], l32[1])
    assert out.dtype == torch.float32 and lse.dtype == torch.float32
    out, lse = merge_pair(o16[0], l32[0], o16[1].double(), l32[1])
    assert out.dtype == F64 and lse.dtype == F64


def test_float32_large_offsets_stay_finite():
    g = torch.Generator().manual_seed(5)
    outs = torch.randn(3, 2, 1, 4, 8, generator=g)
    base = torch.randn(3, 2, 4, 1, generator=g)
    for offset in (1e4, -1e4):
        out, lse = merge_states(outs, base + offset)
        assert out.dtype == torch.float32
        assert torch.isfinite(out).all() and torch.isfinite(lse).all()
        expect = (outs.double() * torch.softmax(base.double(), 0).transpose(2, 3).unsqueeze(-1)).sum(0)
        torch.testing.assert_close(out.double(), expect, rtol=0, atol=5e-3)
        po, pl = fold([(outs[r], base[r] + offset) for r in range(3)])
        assert torch.isfinite(po).all() and torch.isfinite(pl).all()
        torch.testing.assert_close(po.double(), expect, rtol=0, atol=5e-3)
