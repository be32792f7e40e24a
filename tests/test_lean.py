"""LeanAttention stream-K decode kernel (hpcattn.kernels.lean) through Triton's CPU interpreter.

TRITON_INTERPRET=1 is set before triton is imported, so the very kernels that run on GPUs run
here on CPU tensors (numpy). Every case is checked against the float64 reference with
flash-attn's tolerance rule, as in test_kernels.py:

    err_impl = max |lean_decode(q, k, v) - attn_reference(q.double(), ...)|
    err_base = max |same-dtype plain torch attention - reference|
    assert err_impl <= 2 * err_base + 1e-5          (for out and for lse)

Shapes are small (the interpreter is slow) but cut into several KV tiles (block_n = 16/32) and
split over 1, 3, 7 and more-than-work-units programs, so partial pieces, segments spanning many
programs, programs spanning many segments and idle programs are all exercised.
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported anywhere in this process

import bisect  # noqa: E402
import random  # noqa: E402

import pytest  # noqa: E402

pytest.importorskip("triton")

import torch  # noqa: E402

from hpcattn.kernels import attn_reference, head_major  # noqa: E402
from hpcattn.kernels import lean  # noqa: E402
from hpcattn.kernels.lean import lean_decode  # noqa: E402
from hpcattn.kernels.reference import causal_offset  # noqa: E402
from tests.tolerance import max_err, same_dtype_attention  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------------------------
# helpers


def reference(q, k, v, *, scale, lengths, causal="none"):
    """float64 ground truth; bottom-right causal is aligned per sequence, so call per sequence."""
    if causal == "none":
        return attn_reference(q.double(), k.double(), v.double(), scale=scale,
                              k_lengths=torch.tensor(lengths))
    outs, lses = [], []
    for b, n in enumerate(lengths):
        assert causal_offset(causal, q.shape[1], n) == n - q.shape[1]
        o, l = attn_reference(q[b:b + 1].double(), k[b:b + 1, :n].double(), v[b:b + 1, :n].double(),
                              scale=scale, causal=causal)
        outs.append(o)
        lses.append(l)
    return torch.cat(outs), torch.cat(lses)


def make_qkv(B, Sq, Sk, Hq, Hkv, d, dtype, *, seed, kv_layout):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Sq, Hq, d, generator=g).to(dtype)
    k = torch.randn(B, Sk, Hkv, d, generator=g).to(dtype)
    v = torch.randn(B, Sk, Hkv, d, generator=g).to(dtype)
    if kv_layout == "head_major":
        q, k, v = head_major(q), head_major(k), head_major(v)
        assert k.transpose(1, 2).is_contiguous()
    return q, k, v


def check(q, k, v, lengths, *, causal="none", **kw):
    """Run lean_decode and apply the tolerance rule to out and lse."""
    d = q.shape[-1]
    scale = d ** -0.5
    out, lse = lean_decode(q, k, v, scale=scale, k_lengths=lengths, causal=causal, **kw)
    B, Sq, Hq, _ = q.shape
    assert out.shape == (B, Sq, Hq, d) and out.dtype == q.dtype
    assert lse.shape == (B, Hq, Sq) and lse.dtype == torch.float32
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    full = [k.shape[1]] * B if lengths is None else lengths
    ro, rl = reference(q, k, v, scale=scale, lengths=full, causal=causal)
    bo, bl = same_dtype_attention(q, k, v, scale=scale, lengths=full, causal=causal)
    assert torch.equal(torch.isneginf(lse), torch.isneginf(rl)), "empty rows must be exactly -inf"
    assert (out[lse.transpose(1, 2).isneginf()] == 0).all(), "empty rows must have out = 0"
    eo, eb = max_err(out, ro), max_err(bo, ro)
    lo, lb = max_err(lse, rl), max_err(bl, rl)
    assert eo <= 2 * eb + 1e-5, f"out: err_impl={eo:.3e} err_base={eb:.3e}"
    assert lo <= 2 * lb + 1e-5, f"lse: err_impl={lo:.3e} err_base={lb:.3e}"
    return out, lse


# ------------------------------------------------------------------------------------------------
# correctness grid (decode, Sq = 1)

# (B, Hq, Hkv, d, Sk, lengths, dtype, kv layout, num_programs, block_n)
CASES = [
    (3, 8, 2, 64, 77, [0, 1, 77], torch.bfloat16, "head_major", 3, 16),       # G=4, ragged 0/1
    (3, 2, 2, 128, 50, [33, 0, 50], torch.float32, "contiguous", 7, 16),      # G=1
    (1, 8, 1, 128, 100, [100], torch.bfloat16, "head_major", 1, 32),          # G=8, one program
    (1, 16, 2, 64, 40, [40], torch.float32, "contiguous", 64, 16),            # P >> 6 units
    (3, 8, 2, 128, 20, [1, 1, 1], torch.bfloat16, "contiguous", 7, 16),       # length 1 only
    (3, 4, 4, 64, 45, None, torch.float32, "head_major", 3, 16),              # dense, G=1
    (2, 4, 2, 64, 61, [61, 17], torch.float16, "head_major", 5, 16),          # fp16
    (3, 8, 1, 64, 130, [130, 0, 2], torch.bfloat16, "head_major", 7, 32),     # G=8, B=3
    (2, 8, 2, 80, 70, [70, 9], torch.float32, "head_major", 5, 16),           # d=80: masked head dim
    (2, 4, 2, 16, 50, None, torch.float32, "contiguous", 4, 16),              # d=16 < merge block
]
IDS = [f"B{c[0]}-G{c[1] // c[2]}-d{c[3]}-{str(c[6])[6:]}-{c[7]}-P{c[8]}" for c in CASES]


@pytest.mark.parametrize("split", ["stream_k", "aligned"])
@pytest.mark.parametrize("reduction", ["two_kernel", "fused"])
@pytest.mark.parametrize("B,hq,hkv,d,sk,lengths,dtype,layout,P,bn", CASES, ids=IDS)
def test_matches_reference(B, hq, hkv, d, sk, lengths, dtype, layout, P, bn, reduction, split):
    q, k, v = make_qkv(B, 1, sk, hq, hkv, d, dtype, seed=B * 100 + hq + d + sk, kv_layout=layout)
    if split == "aligned":
        P = B * hkv * (P % 3 + 1)                  # 1-3 programs per segment (ragged lengths too)
    check(q, k, v, lengths, num_programs=P, block_n=bn, reduction=reduction, split=split)


def test_random_schedules():
    """Random ragged batches, grids and tile sizes (fp32, d=32): both reductions vs the reference."""
    rnd = random.Random(1)
    for it in range(12):
        B, hkv, G = rnd.randint(1, 4), rnd.choice([1, 2]), rnd.choice([1, 2, 4, 8])
        lengths = [rnd.choice([0, 1, 16, 17, rnd.randint(0, 120)]) for _ in range(B)]
        sk = max(lengths + [1])
        q, k, v = make_qkv(B, 1, sk, G * hkv, hkv, 32, torch.float32, seed=it,
                           kv_layout=rnd.choice(["head_major", "contiguous"]))
        check(q, k, v, lengths, num_programs=rnd.randint(1, 20), block_n=rnd.choice([16, 32]),
              reduction=rnd.choice(["two_kernel", "fused"]))


@pytest.mark.parametrize("reduction", ["two_kernel", "fused"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_tma_loads_match_reference_and_mask_past_lengths(dtype, reduction):
    """TMA descriptor loads read whole tiles, past a sequence's length into the next head's rows:
    those keys must be masked even when the cache holds NaN there (uninitialised capacity)."""
    q, k, v = make_qkv(3, 1, 90, 8, 2, 64, dtype, seed=11, kv_layout="head_major")
    lengths = [90, 37, 0]
    out_ref = check(q, k, v, lengths, num_programs=5, block_n=32, reduction=reduction, tma=True)
    for b, n in enumerate(lengths):
        k[b, n:] = float("nan")
        v[b, n:] = float("nan")
    out, lse = lean_decode(q, k, v, scale=64 ** -0.5, k_lengths=lengths, num_programs=5, block_n=32,
                           reduction=reduction, tma=True)
    assert torch.equal(out, out_ref[0]) and torch.equal(lse, out_ref[1])


def test_tma_needs_head_major_kv():
    q, k, v = make_qkv(2, 1, 40, 4, 2, 64, torch.float32, seed=0, kv_layout="contiguous")
    with pytest.raises(ValueError, match="head-major"):
        lean_decode(q, k, v, scale=0.125, tma=True)
    assert not lean._tma_ok(k, v)                  # the automatic choice falls back silently


def test_num_programs_do_not_change_the_result_much():
    """Different splits of the same problem agree to fp32 merge-order noise (not bitwise)."""
    q, k, v = make_qkv(2, 1, 90, 8, 2, 64, torch.float32, seed=7, kv_layout="head_major")
    ref, _ = lean_decode(q, k, v, scale=0.125, k_lengths=[90, 37], num_programs=1, block_n=16)
    for P in (2, 3, 7, 50):
        o, _ = lean_decode(q, k, v, scale=0.125, k_lengths=[90, 37], num_programs=P, block_n=16)
        assert max_err(o, ref) < 1e-5


def test_default_config_and_odd_head_dim():
    """Default block_n / num_programs, and a head_dim that is not a power of two (masked)."""
    q, k, v = make_qkv(2, 1, 70, 4, 2, 40, torch.float32, seed=3, kv_layout="contiguous")
    check(q, k, v, [70, 9])


def test_all_empty_and_zero_keys():
    q, k, v = make_qkv(2, 1, 8, 4, 2, 64, torch.bfloat16, seed=1, kv_layout="head_major")
    out, lse = lean_decode(q, k, v, scale=0.125, k_lengths=[0, 0], num_programs=3)
    assert torch.isneginf(lse).all() and (out == 0).all()
    out, lse = lean_decode(q, k[:, :0], v[:, :0], scale=0.125)
    assert torch.isneginf(lse).all() and (out == 0).all()


# ------------------------------------------------------------------------------------------------
# small Sq (speculative verification)


@pytest.mark.parametrize("causal", ["none", "bottom_right"])
def test_small_sq(causal):
    """Sq = 3 query rows packed with the G heads; bottom-right causal per sequence; a sequence
    shorter than Sq has rows that see no key (empty state)."""
    q, k, v = make_qkv(3, 3, 40, 8, 2, 64, torch.float32, seed=11, kv_layout="head_major")
    check(q, k, v, [40, 2, 17], causal=causal, num_programs=5, block_n=16)


# ------------------------------------------------------------------------------------------------
# schedule, plan and fused-counter invariants (host side, no kernel math)


def _walk(lengths, Hkv, bn, P, aligned=False):
    """Pure-Python replay of the kernel's walk: returns {(c, s): (t0, t1)} pieces."""
    seg, ranges, T = lean.schedule(tuple(lengths), Hkv, bn, P, aligned)
    pieces = {}
    for c, (start, end) in enumerate(ranges):
        g = start
        s = bisect.bisect_right(seg, start) - 1 if start < T else 0   # the kernel's first segment
        while g < end:
            while seg[s + 1] <= g:
                s += 1
            stop = min(end, seg[s + 1])
            pieces[(c, s)] = (g - seg[s], stop - seg[s])
            g, s = stop, s + 1
    return seg, ranges, T, pieces


@pytest.mark.parametrize("aligned", [False, True])
def test_schedule_covers_every_tile_once_and_slots_are_unique(aligned):
    rnd = random.Random(0)
    for _ in range(200):
        B, Hkv, bn = rnd.randint(1, 5), rnd.randint(1, 4), rnd.choice([16, 64])
        lengths = [rnd.choice([0, 1, rnd.randint(0, 400)]) for _ in range(B)]
        S = B * Hkv
        P = S * rnd.randint(1, 8) if aligned else rnd.randint(1, 40)
        seg, ranges, T, pieces = _walk(lengths, Hkv, bn, P, aligned)
        sizes = [end - start for start, end in ranges]
        if aligned:                                                      # balanced within a segment
            pps = P // S
            for s in range(S):
                own = sizes[s * pps:(s + 1) * pps]
                assert max(own) - min(own) <= 1 and sum(own) == seg[s + 1] - seg[s]
                assert all(s2 == s for (c, s2) in pieces if s * pps <= c < (s + 1) * pps)
        else:
            assert max(sizes) - min(sizes) <= 1 and sum(sizes) == T      # balanced stream-K split
        covered = sorted((seg[s] + t0, seg[s] + t1) for (c, s), (t0, t1) in pieces.items())
        assert all(a[1] == b[0] for a, b in zip(covered, covered[1:]))   # contiguous, no overlap
        if T:
            assert covered[0][0] == 0 and covered[-1][1] == T
        else:
            assert not covered
        slots = [c + s for c, s in pieces]
        assert len(set(slots)) == len(slots) and all(x < len(seg) - 1 + P for x in slots)
        for s in range(len(seg) - 1):                                    # merge pass finds them
            owners = sorted(c for c, s2 in pieces if s2 == s)
            if seg[s + 1] > seg[s]:
                if aligned:
                    first, n = s * (P // S), min(P // S, seg[s + 1] - seg[s])
                else:
                    base, rem = divmod(T, P)

                    def prog_of(t):
                        big = rem * (base + 1)
                        return t // (base + 1) if t < big else rem + (t - big) // max(base, 1)
                    first, n = prog_of(seg[s]), prog_of(seg[s + 1] - 1) - prog_of(seg[s]) + 1
                assert owners == list(range(first, first + n))
            else:
                assert owners == []


def test_choose_split():
    assert lean.same_lengths(None, 4) and lean.same_lengths((5, 5), 2) and lean.same_lengths((9,), 1)
    assert not lean.same_lengths((5, 6), 2) and not lean.same_lengths(torch.tensor([5, 5]), 2)
    assert lean.choose_split(None, True, 32, 132, False) == ("aligned", 128)      # equal lengths
    assert lean.choose_split(None, False, 16, 132, False) == ("stream_k", 132)    # ragged
    assert lean.choose_split(None, True, 8, 132, True) == ("stream_k", 132)       # given, 8 does not divide
    assert lean.choose_split(None, True, 8, 128, True) == ("aligned", 128)
    assert lean.choose_split(None, True, 512, 264, False) == ("stream_k", 264)    # P < S
    assert lean.choose_split("aligned", False, 16, 40, True) == ("aligned", 32)
    with pytest.raises(ValueError):
        lean.choose_split("aligned", True, 64, 40, True)
    with pytest.raises(ValueError):
        lean.choose_split("round_robin", True, 64, 40, True)


def test_fused_counters_reset_after_each_call():
    q, k, v = make_qkv(2, 1, 64, 4, 2, 64, torch.float32, seed=5, kv_layout="head_major")
    for _ in range(2):
        lean_decode(q, k, v, scale=0.125, k_lengths=[64, 50], num_programs=5, block_n=16,
                    reduction="fused")
        assert (lean._counters(4, q.device) == 0).all()


def test_argument_validation():
    q, k, v = make_qkv(2, 1, 8, 4, 2, 64, torch.float32, seed=0, kv_layout="contiguous")
    bad = [
        dict(k_lengths=[8]),                       # wrong count
        dict(k_lengths=[9, 1]),                    # longer than Sk
        dict(k_lengths=[-1, 1]),
        dict(causal="square"),
        dict(reduction="atomic"),
        dict(num_programs=0),
        dict(block_n=24),
    ]
    for kw in bad:
        with pytest.raises(ValueError):
            lean_decode(q, k, v, scale=0.125, **kw)
    with pytest.raises(ValueError):                # Hq % Hkv
        lean_decode(q[:, :, :3], k, v, scale=0.125)
    with pytest.raises(ValueError):                # dtype mismatch
        lean_decode(q.double(), k, v, scale=0.125)
    with pytest.raises(ValueError):                # G * Sq too large for a decode kernel
        lean_decode(q.expand(2, 65, 4, 64), k, v, scale=0.125)
