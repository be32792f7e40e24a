"""CPU attention backends vs the float64 reference, with flash-attn's tolerance rule.

For every case the inputs are generated once in the test dtype. Then

    ref      = attn_reference(q.double(), k.double(), v.double())       # ground truth
    err_impl = max |kernel(q, k, v)          - ref|
    err_base = max |same_dtype_attention(q, k, v) - ref|              # plain torch in q.dtype
    assert err_impl <= 2 * err_base + 1e-5

applied to ``out`` and to ``lse`` (spec exemplars.md section 2).
"""

from __future__ import annotations

import math
import zlib

import pytest
import torch

from hpcattn.kernels import Kernel, attn_reference, attn_with_lse, select_kernel
from hpcattn.kernels.reference import causal_offset
from tests.tolerance import max_err, same_dtype_attention

CPU_BACKENDS = ("torch_ref", "cpu_flash")
pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------------------------
# helpers


def make_qkv(B, Sq, Sk, Hq, Hkv, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Sq, Hq, d, generator=g).to(dtype)
    k = torch.randn(B, Sk, Hkv, d, generator=g).to(dtype)
    v = torch.randn(B, Sk, Hkv, d, generator=g).to(dtype)
    return q, k, v


def check_against_reference(kern, q, k, v, *, causal, scale=None):
    """Apply the tolerance rule to out and lse; return (err_impl_out, err_base_out)."""
    d = q.shape[-1]
    scale = d ** -0.5 if scale is None else scale
    out, lse = kern(q, k, v, scale=scale, causal=causal)
    B, Sq, Hq, _ = q.shape
    assert out.shape == q.shape and out.dtype == q.dtype
    assert lse.shape == (B, Hq, Sq)
    assert lse.dtype == (torch.float64 if q.dtype == torch.float64 else torch.float32)
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()

    ro, rl = attn_reference(q.double(), k.double(), v.double(), scale=scale, causal=causal)
    bo, bl = same_dtype_attention(q, k, v, scale=scale, causal=causal)

    # -inf exactly where the reference has it (empty rows), finite elsewhere
    assert torch.equal(torch.isneginf(lse), torch.isneginf(rl))
    assert torch.isfinite(lse[~torch.isneginf(rl)]).all()

    eo_impl, eo_base = max_err(out, ro), max_err(bo, ro)
    el_impl, el_base = max_err(lse, rl), max_err(bl, rl)
    assert eo_impl <= 2 * eo_base + 1e-5, f"out: err_impl={eo_impl:.3e} err_base={eo_base:.3e}"
    assert el_impl <= 2 * el_base + 1e-5, f"lse: err_impl={el_impl:.3e} err_base={el_base:.3e}"
    return eo_impl, eo_base


def kernel_for(backend, dtype, d):
    return select_kernel(backend, "cpu", dtype, d)


# ------------------------------------------------------------------------------------------------
# grids

DTYPE_CASES = [
    ("torch_ref", torch.float64),
    ("torch_ref", torch.float32),
    ("torch_ref", torch.bfloat16),
    ("cpu_flash", torch.float32),
    ("cpu_flash", torch.bfloat16),
]
DTYPE_IDS = [f"{b}-{str(t).replace('torch.', '')}" for b, t in DTYPE_CASES]

# (Sq, Sk, causal): odd lengths, decode-like Sq != Sk, and bottom-right with Sq > Sk
SEQ_CASES = [
    (1, 1, "none"), (1, 1, "square"), (1, 1, "bottom_right"),
    (7, 7, "none"), (7, 7, "square"), (7, 7, "bottom_right"),
    (97, 97, "none"), (97, 97, "square"),
    (129, 129, "none"), (129, 129, "square"), (129, 129, "bottom_right"),
    (1, 339, "none"), (1, 339, "bottom_right"),
    (3, 100, "none"), (3, 100, "bottom_right"),
    (97, 129, "bottom_right"),
    (7, 3, "bottom_right"), (129, 97, "bottom_right"), (129, 97, "none"),
]
SEQ_IDS = [f"{a}x{b}-{c}" for a, b, c in SEQ_CASES]

# (B, Hq, Hkv, d): GQA groups 1/2/4, batch 1/3, head_dim 32/64/128
HEAD_CASES = [
    (1, 4, 4, 32),
    (3, 4, 2, 64),
    (1, 8, 2, 128),
    (3, 8, 2, 32),
]
HEAD_IDS = [f"B{b}-Hq{hq}-Hkv{hkv}-d{d}" for b, hq, hkv, d in HEAD_CASES]


@pytest.mark.parametrize("backend,dtype", DTYPE_CASES, ids=DTYPE_IDS)
@pytest.mark.parametrize("sq,sk,causal", SEQ_CASES, ids=SEQ_IDS)
@pytest.mark.parametrize("B,hq,hkv,d", HEAD_CASES, ids=HEAD_IDS)
def test_backend_matches_reference(backend, dtype, sq, sk, causal, B, hq, hkv, d):
    kern = kernel_for(backend, dtype, d)
    assert kern.name == backend
    seed = zlib.crc32(f"{sq}/{sk}/{causal}/{B}/{hq}/{hkv}/{d}".encode()) % 10000
    q, k, v = make_qkv(B, sq, sk, hq, hkv, d, dtype, seed=seed)
    check_against_reference(kern, q, k, v, causal=causal)


@pytest.mark.parametrize("backend,dtype", DTYPE_CASES, ids=DTYPE_IDS)
@pytest.mark.parametrize("d", [32, 64, 128])
@pytest.mark.parametrize("hq,hkv", [(4, 4), (4, 2), (8, 2)])
def test_gqa_and_head_dim_grid(backend, dtype, d, hq, hkv):
    """Full GQA x head_dim grid on one causal decode-like and one causal square shape."""
    kern = kernel_for(backend, dtype, d)
    for sq, sk, causal in ((5, 70, "bottom_right"), (33, 33, "square")):
        q, k, v = make_qkv(2, sq, sk, hq, hkv, d, dtype, seed=d + hq + hkv)
        check_against_reference(kern, q, k, v, causal=causal)


def test_same_dtype_baseline_is_meaningful():
    """The baseline helper really runs in low precision (otherwise the rule would be vacuous)."""
    q, k, v = make_qkv(1, 16, 64, 4, 4, 64, torch.bfloat16)
    ro, _ = attn_reference(q.double(), k.double(), v.double(), scale=0.125)
    bo, bl = same_dtype_attention(q, k, v, scale=0.125)
    assert bo.dtype == torch.bfloat16 and bl.dtype == torch.bfloat16
    assert max_err(bo, ro) > 1e-4
    q32, k32, v32 = (t.float() for t in (q, k, v))
    bo32, _ = same_dtype_attention(q32, k32, v32, scale=0.125)
    assert max_err(bo32, ro) < 1e-5


def test_scale_is_included_in_lse():
    q, k, v = make_qkv(1, 4, 9, 2, 2, 32, torch.float64)
    for scale in (0.05, 1.0):
        out, lse = kernel_for("torch_ref", torch.float64, 32)(q, k, v, scale=scale)
        s = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
        torch.testing.assert_close(lse, torch.logsumexp(s, -1), rtol=0, atol=1e-12)


def test_float64_reference_matches_textbook_softmax():
    """attn_reference itself against an independent dense softmax formula (float64)."""
    q, k, v = make_qkv(2, 6, 11, 4, 2, 16, torch.float64, seed=3)
    scale = 0.3
    out, lse = attn_reference(q, k, v, scale=scale, causal="bottom_right")
    kk = k.repeat_interleave(2, dim=2)
    vv = v.repeat_interleave(2, dim=2)
    s = torch.einsum("bqhd,bkhd->bhqk", q, kk) * scale
    mask = torch.ones(6, 11, dtype=torch.bool).tril(diagonal=11 - 6)
    s = s.masked_fill(~mask, float("-inf"))
    p = torch.softmax(s, -1)
    torch.testing.assert_close(out, torch.einsum("bhqk,bkhd->bqhd", p, vv), rtol=0, atol=1e-12)
    torch.testing.assert_close(lse, torch.logsumexp(s, -1), rtol=0, atol=1e-12)
    assert out.dtype == torch.float64 and lse.dtype == torch.float64


def test_auto_on_cpu_selects_a_cpu_backend():
    for dtype in (torch.float32, torch.bfloat16):
        assert select_kernel("auto", "cpu", dtype, 64).name in CPU_BACKENDS
    # cpu_flash keeps lse in float32, so it cannot pass the float64 self-test: auto falls back
    assert select_kernel("auto", "cpu", torch.float64, 64).name == "torch_ref"


def test_gpu_backend_on_cpu_is_refused():
    from hpcattn.errors import HpcattnError

    with pytest.raises(HpcattnError, match="aten_flash"):
        select_kernel("aten_flash", "cpu", torch.float32, 64)


def test_attn_with_lse_dispatches():
    q, k, v = make_qkv(1, 3, 10, 4, 2, 32, torch.float32)
    o1, l1 = attn_with_lse(q, k, v, scale=0.2, causal="bottom_right", backend="torch_ref")
    o2, l2 = Kernel("torch_ref")(q, k, v, scale=0.2, causal="bottom_right")
    assert torch.equal(o1, o2) and torch.equal(l1, l2)


# ------------------------------------------------------------------------------------------------
# ragged batches, empty key sets, empty rows


@pytest.mark.parametrize("backend,dtype", DTYPE_CASES, ids=DTYPE_IDS)
@pytest.mark.parametrize("causal", ["none", "bottom_right"])
def test_ragged_k_lengths(backend, dtype, causal):
    """Sequence b sees keys [0, k_lengths[b]); a 0 length gives the empty state."""
    kern = kernel_for(backend, dtype, 64)
    lengths = [17, 0, 40, 1]
    B, Sk, Hq, Hkv, d = len(lengths), 40, 4, 2, 64
    q, k, v = make_qkv(B, 1, Sk, Hq, Hkv, d, dtype, seed=11)
    # poison the padding: a kernel that reads it would be visibly wrong
    for b, n in enumerate(lengths):
        k[b, n:] = 100
        v[b, n:] = 1e4
    scale = d ** -0.5
    out, lse = kern(q, k, v, scale=scale, causal=causal, k_lengths=lengths)
    assert out.shape == (B, 1, Hq, d) and lse.shape == (B, Hq, 1)
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()

    ro, rl = attn_reference(q.double(), k.double(), v.double(), scale=scale, causal=causal,
                            k_lengths=torch.tensor(lengths))
    # the 0-length sequence is exactly the empty state
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    assert torch.isneginf(lse[1]).all()
    assert torch.isneginf(rl[1]).all()
    for b, n in enumerate(lengths):
        if n == 0:
            continue
        bo, bl = same_dtype_attention(q[b:b + 1], k[b:b + 1, :n], v[b:b + 1, :n], scale=scale,
                                      causal=causal)
        eo, el = max_err(out[b:b + 1], ro[b:b + 1]), max_err(lse[b:b + 1], rl[b:b + 1])
        assert eo <= 2 * max_err(bo, ro[b:b + 1]) + 1e-5, (b, eo)
        assert el <= 2 * max_err(bl, rl[b:b + 1]) + 1e-5, (b, el)


def test_ragged_all_full_lengths_equals_dense():
    kern = kernel_for("torch_ref", torch.float64, 32)
    q, k, v = make_qkv(2, 3, 12, 2, 2, 32, torch.float64)
    a = kern(q, k, v, scale=0.1, k_lengths=[12, 12])
    b = kern(q, k, v, scale=0.1)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.parametrize("backend,dtype", DTYPE_CASES, ids=DTYPE_IDS)
@pytest.mark.parametrize("causal", ["none", "bottom_right"])
def test_zero_keys_gives_empty_state(backend, dtype, causal):
    kern = kernel_for(backend, dtype, 32)
    B, Sq, Hq, d = 2, 5, 4, 32
    q, k, v = make_qkv(B, Sq, 0, Hq, 2, d, dtype)
    out, lse = kern(q, k, v, scale=0.2, causal=causal)
    assert out.shape == (B, Sq, Hq, d) and out.dtype == dtype
    assert lse.shape == (B, Hq, Sq)
    assert torch.equal(out, torch.zeros_like(out))
    assert torch.isneginf(lse).all()
    assert not torch.isnan(out).any()
    # and the reference agrees on the empty state
    ro, rl = attn_reference(q.double(), k.double(), v.double(), scale=0.2, causal=causal)
    assert torch.equal(ro, torch.zeros_like(ro)) and torch.isneginf(rl).all()


@pytest.mark.parametrize("backend,dtype", DTYPE_CASES, ids=DTYPE_IDS)
def test_bottom_right_more_queries_than_keys_has_empty_first_rows(backend, dtype):
    """Sq > Sk bottom-right: rows i < Sq - Sk see no key; the others are square-causal on K."""
    kern = kernel_for(backend, dtype, 32)
    B, Sq, Sk, Hq, Hkv, d = 2, 9, 4, 4, 2, 32
    q, k, v = make_qkv(B, Sq, Sk, Hq, Hkv, d, dtype, seed=5)
    out, lse = kern(q, k, v, scale=d ** -0.5, causal="bottom_right")
    n_empty = Sq - Sk
    assert torch.equal(out[:, :n_empty], torch.zeros_like(out[:, :n_empty]))
    assert torch.isneginf(lse[:, :, :n_empty]).all()
    assert torch.isfinite(lse[:, :, n_empty:]).all()
    assert not torch.isnan(out).any()
    # the last Sk rows equal square-causal attention of q[:, -Sk:] on all keys
    o2, l2 = kern(q[:, n_empty:], k, v, scale=d ** -0.5, causal="square")
    tol = 1e-12 if dtype == torch.float64 else (1e-5 if dtype == torch.float32 else 1e-2)
    torch.testing.assert_close(out[:, n_empty:].double(), o2.double(), rtol=0, atol=tol)
    torch.testing.assert_close(lse[:, :, n_empty:].double(), l2.double(), rtol=0, atol=tol)
    # row n_empty sees exactly key 0: out equals v[0] of its kv head
    g = Hq // Hkv
    expect = v[:, 0].repeat_interleave(g, dim=1)          # (B, Hq, d)
    torch.testing.assert_close(out[:, n_empty].double(), expect.double(), rtol=0, atol=tol)


def test_square_causal_needs_equal_lengths():
    q, k, v = make_qkv(1, 3, 5, 2, 2, 32, torch.float32)
    with pytest.raises(ValueError, match="square"):
        Kernel("torch_ref")(q, k, v, scale=0.1, causal="square")
    with pytest.raises(ValueError):
        causal_offset("diagonal", 3, 3)


def test_decode_lse_value_large_context():
    """Sanity on magnitude: uniform scores over N keys give lse = log N exactly (float64)."""
    N = 339
    q = torch.zeros(1, 1, 2, 32, dtype=torch.float64)
    k = torch.randn(1, N, 2, 32, dtype=torch.float64)
    v = torch.randn(1, N, 2, 32, dtype=torch.float64)
    out, lse = kernel_for("torch_ref", torch.float64, 32)(q, k, v, scale=1.0)
    torch.testing.assert_close(lse, torch.full_like(lse, math.log(N)), rtol=0, atol=1e-12)
    torch.testing.assert_close(out[0, 0], v[0].mean(0), rtol=0, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tolerance_rule_rejects_a_wrong_kernel(dtype):
    """The rule is discriminating: a kernel with top-left instead of bottom-right causal fails it,
    and so does one that drops the softmax scale from lse."""
    good = kernel_for("torch_ref", dtype, 32)

    def top_left(q, k, v, *, scale, causal="none", k_lengths=None):
        mask = torch.ones(q.shape[1], k.shape[1], dtype=torch.bool).tril()
        o, l = attn_reference(q, k, v, scale=scale, mask=mask)
        return o, l.float()

    def lse_without_scale(q, k, v, *, scale, causal="none", k_lengths=None):
        o, l = good(q, k, v, scale=scale, causal=causal)
        return o, l / scale

    q, k, v = make_qkv(1, 3, 100, 4, 2, 32, dtype, seed=1)
    for bad in (top_left, lse_without_scale):
        with pytest.raises(AssertionError):
            check_against_reference(bad, q, k, v, causal="bottom_right")
    check_against_reference(good, q, k, v, causal="bottom_right")


def test_zero_keys_float64_lse_dtype():
    kern = kernel_for("torch_ref", torch.float64, 32)
    q, k, v = make_qkv(1, 2, 0, 2, 2, 32, torch.float64)
    _, lse = kern(q, k, v, scale=0.1)
    assert attn_reference(q, k, v, scale=0.1)[1].dtype == torch.float64
    assert lse.dtype == torch.float64
