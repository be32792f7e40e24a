"""LeanAttention kernel compiled for the GPU (``pytest -m gpu tests/test_lean_gpu.py``; device machine).

tests/test_lean.py sets TRITON_INTERPRET=1 for its whole pytest process, so the compiled kernels
are checked in a fresh subprocess with that variable removed. Cases: bf16/fp16, GQA 1/4/8,
d 64/128, ragged lengths incl. 0 and 1, tile-boundary lengths, several grid sizes, both reductions,
small Sq with bottom-right causal, pointer and TMA loads (NaN past the lengths), repeated launches
of the fused reduction (its arrival counters must reset, its cross-program memory ordering must
hold), and the aligned split with and without the PDL merge.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

pytestmark = pytest.mark.gpu

PRELUDE = textwrap.dedent(r"""
    import random, torch
    from hpcattn.kernels import attn_reference, head_major
    from hpcattn.kernels.lean import lean_decode

    def err(a, b):
        a, b = a.double(), b.double()
        both = torch.isneginf(a) & torch.isneginf(b)
        return torch.where(both, torch.zeros_like(a), (a - b).abs()).max().item()
""")

SCRIPT = PRELUDE + textwrap.dedent(r"""

    def same_dtype(q, k, v, scale, lengths):
        B, Sq, Hq, d = q.shape
        g = Hq // k.shape[2]
        kk, vv = k.repeat_interleave(g, 2), v.repeat_interleave(g, 2)
        s = torch.einsum("bqhd,bkhd->bhqk", q, kk) * scale
        keep = torch.arange(k.shape[1], device=q.device).view(1, 1, 1, -1) < torch.tensor(lengths, device=q.device).view(B, 1, 1, 1)
        s = s.masked_fill(~keep, float("-inf"))
        lse = torch.logsumexp(s, -1)
        p = torch.exp(s - torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)[..., None])
        return torch.einsum("bhqk,bkhd->bqhd", p.to(q.dtype), vv), lse.to(q.dtype)

    rnd = random.Random(0)
    n_checked = 0
    for dtype in (torch.bfloat16, torch.float16):
        for (hq, hkv, d) in ((8, 8, 128), (32, 8, 128), (16, 2, 64), (8, 1, 128)):
            for lengths in ([0, 1, 4097, 300], [64 * 3, 128 * 5, 1], [20000]):
                B, Sk = len(lengths), max(lengths)
                q = torch.randn(B, 1, hq, d, device="cuda").to(dtype)
                k = head_major(torch.randn(B, Sk, hkv, d, device="cuda").to(dtype))
                v = head_major(torch.randn(B, Sk, hkv, d, device="cuda").to(dtype))
                scale = d ** -0.5
                ro, rl = attn_reference(q.double(), k.double(), v.double(), scale=scale,
                                        k_lengths=torch.tensor(lengths))
                bo, bl = same_dtype(q, k, v, scale, lengths)
                for P in (1, 7, 132, 264, 1000):
                    variants = [("two_kernel", False), ("fused", False)]
                    if dtype == torch.bfloat16 and P in (7, 264):      # TMA loads (fewer compiles)
                        variants += [("two_kernel", True), ("fused", True)]
                    for red, tma in variants:
                        o, l = lean_decode(q, k, v, scale=scale, k_lengths=lengths, num_programs=P,
                                           reduction=red, tma=tma)
                        assert not torch.isnan(o).any() and not torch.isnan(l).any()
                        assert torch.equal(torch.isneginf(l.cpu()), torch.isneginf(rl.cpu()))
                        eo, lo = err(o, ro), err(l, rl)
                        assert eo <= 2 * err(bo, ro) + 1e-5, (dtype, hq, hkv, d, lengths, P, red, tma, eo)
                        assert lo <= 2 * err(bl, rl) + 1e-5, (dtype, hq, hkv, d, lengths, P, red, tma, lo)
                        n_checked += 1
    # TMA loads: keys past a length hold NaN (an uninitialised cache) and must not leak in
    k = head_major(torch.randn(2, 5000, 8, 128, device="cuda", dtype=torch.bfloat16))
    v = head_major(torch.randn(2, 5000, 8, 128, device="cuda", dtype=torch.bfloat16))
    k[:, 3001:] = float("nan")
    v[:, 3001:] = float("nan")
    q = torch.randn(2, 1, 32, 128, device="cuda", dtype=torch.bfloat16)
    ref = lean_decode(q, k, v, scale=0.09, k_lengths=[3001, 17], tma=False)
    for red in ("two_kernel", "fused"):
        o, l = lean_decode(q, k, v, scale=0.09, k_lengths=[3001, 17], tma=True, reduction=red)
        assert not torch.isnan(o).any() and err(o, ref[0]) < 1e-2 and err(l, ref[1]) < 1e-4, red
    # contiguous (non-head-major) KV and q, small Sq bottom-right causal
    q = torch.randn(2, 4, 16, 128, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(2, 3000, 4, 128, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    for n0 in (3000, 2):
        lengths = [n0, 1777]
        o, l = lean_decode(q, k, v, scale=0.1, k_lengths=lengths, causal="bottom_right", num_programs=50)
        for b, n in enumerate(lengths):
            ro, rl = attn_reference(q[b:b+1].double(), k[b:b+1, :n].double(), v[b:b+1, :n].double(),
                                    scale=0.1, causal="bottom_right")
            assert err(o[b:b+1], ro) < 2e-2 and err(l[b:b+1], rl) < 1e-3, (n, err(o[b:b+1], ro))
    # fused reduction stress: many launches, random lengths, must match the two-kernel result
    for it in range(200):
        B = rnd.randint(1, 6)
        lengths = [rnd.choice([0, 1, rnd.randint(1, 6000)]) for _ in range(B)]
        Sk = max(max(lengths), 1)
        q = torch.randn(B, 1, 32, 128, device="cuda", dtype=torch.bfloat16)
        k = head_major(torch.randn(B, Sk, 8, 128, device="cuda", dtype=torch.bfloat16))
        v = head_major(torch.randn(B, Sk, 8, 128, device="cuda", dtype=torch.bfloat16))
        P = rnd.choice([3, 64, 132, 264, 528])
        o1, l1 = lean_decode(q, k, v, scale=0.09, k_lengths=lengths, num_programs=P, reduction="fused",
                             tma=it % 2 == 1)
        o2, l2 = lean_decode(q, k, v, scale=0.09, k_lengths=lengths, num_programs=P, reduction="two_kernel")
        assert err(o1, o2) < 1e-2 and err(l1, l2) < 1e-4, (it, lengths, P)
    print("LEAN_GPU_OK", n_checked)
""")

# The aligned split and the PDL merge (the B = 1 defaults on Hopper) on the cases where they differ
# from stream-K: lengths 0 and 1, more programs per segment than tiles (empty pieces), both
# reductions, PDL on and off, device lengths; a few compiles only.
ALIGNED_SCRIPT = PRELUDE + textwrap.dedent(r"""
    n = 0
    for lengths in ([20000], [1], [0], [4097, 0, 1, 300], [130, 130]):
        B, Sk = len(lengths), max(max(lengths), 1)
        q = torch.randn(B, 1, 32, 128, device="cuda").to(torch.bfloat16)
        k = head_major(torch.randn(B, Sk, 8, 128, device="cuda").to(torch.bfloat16))
        v = head_major(torch.randn(B, Sk, 8, 128, device="cuda").to(torch.bfloat16))
        ro, rl = attn_reference(q.double(), k.double(), v.double(), scale=0.09, k_lengths=torch.tensor(lengths))
        for P in (None, 1000):
            for red in ("two_kernel", "fused"):
                for pdl in (True, False):
                    for lens in (lengths, torch.tensor(lengths, device="cuda", dtype=torch.int32)):
                        o, l = lean_decode(q, k, v, scale=0.09, k_lengths=lens, num_programs=P, reduction=red,
                                           split="aligned", pdl=pdl)
                        assert not torch.isnan(o).any()
                        assert torch.equal(torch.isneginf(l.cpu()), torch.isneginf(rl.cpu())), (lengths, P, red)
                        assert err(o, ro) < 2e-2 and err(l, rl) < 1e-3, (lengths, P, red, pdl, err(o, ro))
                        n += 1
    print("LEAN_ALIGNED_OK", n)
""")


def _run_script(script: str, marker: str):
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    r = subprocess.run([sys.executable, "-c", script], env=env, cwd=root, capture_output=True,
                       text=True, timeout=900)
    assert r.returncode == 0 and marker in r.stdout, r.stdout[-3000:] + r.stderr[-5000:]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_lean_aligned_split_and_pdl_merge():
    _run_script(ALIGNED_SCRIPT, "LEAN_ALIGNED_OK")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_lean_compiled_kernels_match_reference():
    _run_script(SCRIPT, "LEAN_GPU_OK")
