"""Decode-step matrix-vector products with their neighbours fused in (Triton).

A decode step multiplies a few token rows by every weight matrix once, so it is bound by the bytes
of the weights; around each product sit small ops (RMSNorm before q/k/v and gate/up, SiLU(gate) *
up before down, the residual add after o and down) that read a few KB each but cost a kernel
launch slot (~2 us in a CUDA graph). :func:`gemv` computes

    y = [residual +] prologue(x) @ weight.T [+ bias]

in one kernel: every program recomputes the prologue of the few token rows it needs (they sit in
L2), streams its ``BLOCK_N`` rows of the weight once, and adds bias and residual before its one
store. Prologues: ``rmsnorm`` (``norm_weight``, ``eps``: the rounding of
:func:`hpcattn.model.fused_decode.rmsnorm`), ``silu_mul`` (x = [gate | up], the rounding of
:func:`hpcattn.model.fused_decode.silu_mul`), or none.

Shapes: x (M, K) or (M, 2K) for ``silu_mul``, contiguous rows; weight (N, K) contiguous (an
``nn.Linear`` weight); bias (N,); residual (M, N); result (M, N) in x's dtype. M is the decode
batch (at most :data:`MAX_ROWS`). Accumulation is float32 (float32 inputs: IEEE products, no TF32;
under the interpreter bf16/fp16 products are formed in float32, which is exact).
The kernels run on CUDA and under Triton's CPU interpreter (tests).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from hpcattn.kernels.lean import interpreter_shim

MAX_ROWS = 16           # token rows per call (one tl.dot tile); larger batches use cuBLAS
PROLOGUES = ("none", "rmsnorm", "silu_mul")


@triton.jit
def _gemv(X, W, Y, BIAS, RES, NW, M, N, K, sx, eps,
          PROLOGUE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr,
          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, UPCAST: tl.constexpr,
          ROW_K: tl.constexpr):
    """Program n: rows [n*BLOCK_N, (n+1)*BLOCK_N) of Y (M, N) = prologue(X) @ W.T (+ BIAS, RES)."""
    pid = tl.program_id(0).to(tl.int64)
    rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = tl.arange(0, BLOCK_M)
    rk = tl.arange(0, BLOCK_K)
    nmask = rn < N
    mmask = rm < M
    if PROLOGUE == 1:                                  # RMSNorm: the mean square of each row first
        if ROW_K > 0:                                  # the whole row in one load (one L2 round trip)
            kr = tl.arange(0, ROW_K)
            xr = tl.load(X + rm[:, None] * sx + kr[None, :], mask=mmask[:, None] & (kr < K)[None, :],
                         other=0.0).to(tl.float32)
            ss = tl.sum(xr * xr, 1)
        else:
            ss = tl.zeros([BLOCK_M], tl.float32)
            for k0 in range(0, K, BLOCK_K):
                kk = k0 + rk
                xr = tl.load(X + rm[:, None] * sx + kk[None, :], mask=mmask[:, None] & (kk < K)[None, :],
                             other=0.0).to(tl.float32)
                ss += tl.sum(xr * xr, 1)
        r = 1.0 / tl.sqrt(ss / K + eps)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    if BLOCK_M == 1:                                   # per-lane partial sums, reduced once at the end
        part = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        km = kk < K
        xm = mmask[:, None] & km[None, :]
        if PROLOGUE == 2:                              # silu(gate) rounded, times up, rounded
            a = tl.load(X + rm[:, None] * sx + kk[None, :], mask=xm, other=0.0).to(tl.float32)
            s = (a / (1.0 + tl.exp(-a))).to(X.dtype.element_ty)
            b = tl.load(X + rm[:, None] * sx + K + kk[None, :], mask=xm, other=0.0).to(tl.float32)
            xv = (s.to(tl.float32) * b).to(X.dtype.element_ty)
        else:
            xv = tl.load(X + rm[:, None] * sx + kk[None, :], mask=xm, other=0.0)
            if PROLOGUE == 1:                          # (x * r) rounded, times the norm weight, rounded
                y = (xv.to(tl.float32) * r[:, None]).to(X.dtype.element_ty)
                nw = tl.load(NW + kk, mask=km, other=0.0)
                xv = (y.to(tl.float32) * nw.to(tl.float32)[None, :]).to(X.dtype.element_ty)
        w = tl.load(W + rn[:, None] * K + kk[None, :], mask=nmask[:, None] & km[None, :], other=0.0)
        if BLOCK_M == 1:
            part += xv.to(tl.float32) * w.to(tl.float32)
        elif UPCAST:                                   # the interpreter's bf16 dot is wrong: exact float32
            acc = tl.dot(xv.to(tl.float32), tl.trans(w.to(tl.float32)), acc, input_precision="ieee")
        else:
            acc = tl.dot(xv, tl.trans(w), acc, input_precision="ieee")
    if BLOCK_M == 1:
        acc += tl.sum(part, 1)[None, :]
    if HAS_BIAS:
        acc += tl.load(BIAS + rn, mask=nmask, other=0.0).to(tl.float32)[None, :]
    om = mmask[:, None] & nmask[None, :]
    if HAS_RES:
        acc += tl.load(RES + rm[:, None] * N + rn[None, :], mask=om, other=0.0).to(tl.float32)
    tl.store(Y + rm[:, None] * N + rn[None, :], acc.to(X.dtype.element_ty).to(Y.dtype.element_ty), mask=om)


# Where gemv beats cuBLAS plus the small ops around it, and with which launch parameters: one H200,
# Llama-3.1-8B shapes, bf16, best of benchmarks/decode_step.py's products-section sweeps (2026-12-03;
# benchmarks/results/decode_step_h200_2026-12-03_{gemv_sweep,partial_sums_sweep,final}.log). Keys:
# (kind, largest M, largest N or None); the first entry that fits wins. At B=1 every product wins (us, gemv vs cuBLAS + ops, final
# run): RMSNorm + q/k/v 15.4 vs 17.8, o + residual 11.2 vs 14.9, RMSNorm + gate/up 56.2 vs 58.3,
# SiLU*up + down + residual 33.0 vs 35.3, RMSNorm + lm_head 234 vs 243. At B=8 only o + residual
# wins (11.9 vs 14.9); the tl.dot path with a prologue loses (0.16-0.64x), so tuned() says None there
# and the decode step keeps cuBLAS.
TUNED = {("residual", 1, None): {"BLOCK_N": 16, "BLOCK_K": 512, "num_warps": 8, "num_stages": 3},
         ("residual", MAX_ROWS, None): {"BLOCK_N": 32, "BLOCK_K": 1024, "num_warps": 4, "num_stages": 3},
         ("silu_mul", 1, None): {"BLOCK_N": 16, "BLOCK_K": 512, "num_warps": 8, "num_stages": 3},
         ("rmsnorm", 1, 8192): {"BLOCK_N": 16, "BLOCK_K": 512, "num_warps": 4, "num_stages": 3},
         ("rmsnorm", 1, None): {"BLOCK_N": 16, "BLOCK_K": 256, "num_warps": 4, "num_stages": 3}}


def tuned(kind: str, M: int, dtype: torch.dtype = torch.bfloat16, N: int = 0) -> dict | None:
    """The measured-best launch parameters for a ``kind`` (``residual``: plain product plus the
    residual; ``silu_mul``; ``rmsnorm``) product of M token rows and N outputs, or None where cuBLAS
    was faster. The tiles were tuned for 2-byte dtypes; float32 (validation runs) takes the same
    products with :func:`config`'s smaller tiles ({}: the tuned ones exceed shared memory there)."""
    for (k, rows, n_max), cfg in TUNED.items():
        if k == kind and M <= rows and (n_max is None or N <= n_max):
            return cfg if dtype.itemsize == 2 else {}
    return None


def config(M: int, N: int, K: int) -> dict:
    """Launch parameters for an (M, N, K) product: BLOCK_N rows of the weight per program (enough
    programs for every SM a few times over), BLOCK_K columns per load."""
    return {"BLOCK_N": 16 if N <= 8192 else 32, "BLOCK_K": 512 if M == 1 else 256,
            "num_warps": 4, "num_stages": 3}


def supported(x: torch.Tensor) -> bool:
    """Can :func:`gemv` take these token rows? (at most MAX_ROWS rows; float dtypes tl.dot takes)."""
    return x.shape[0] <= MAX_ROWS and x.dtype in (torch.bfloat16, torch.float16, torch.float32)


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
         residual: torch.Tensor | None = None, prologue: str = "none",
         norm_weight: torch.Tensor | None = None, eps: float = 0.0, out_dtype: torch.dtype | None = None,
         cfg: dict | None = None) -> torch.Tensor:
    """[residual +] prologue(x) @ weight.T [+ bias] in one kernel (shapes: module docstring). The
    result is rounded to x's dtype, then stored as ``out_dtype`` (default x's dtype; float32 logits
    without a separate cast kernel)."""
    if prologue not in PROLOGUES:
        raise ValueError(f"gemv prologue {prologue!r}: expected one of {PROLOGUES}")
    M, Kx = x.shape
    N, K = weight.shape
    if Kx != (2 * K if prologue == "silu_mul" else K) or x.stride(1) != 1 or weight.stride() != (K, 1):
        raise ValueError(f"gemv: x {tuple(x.shape)} (strides {x.stride()}) does not fit weight {tuple(weight.shape)}")
    if M > MAX_ROWS:
        raise ValueError(f"gemv: {M} token rows, at most {MAX_ROWS}")
    if (prologue == "rmsnorm") != (norm_weight is not None):
        raise ValueError("gemv: norm_weight is needed by, and only by, the rmsnorm prologue")
    if residual is not None and (residual.shape != (M, N) or not residual.is_contiguous()):
        raise ValueError(f"gemv: residual {tuple(residual.shape)} is not a contiguous ({M}, {N})")
    if x.device.type != "cuda":
        interpreter_shim()                             # Triton's CPU interpreter (tests)
    y = torch.empty(M, N, dtype=out_dtype or x.dtype, device=x.device)
    c = dict(config(M, N, K), **(cfg or {}))
    bm = 1 if M == 1 else 16
    _gemv[(triton.cdiv(N, c["BLOCK_N"]),)](
        x, weight, y, bias if bias is not None else y, residual if residual is not None else y,
        norm_weight if norm_weight is not None else y, M, N, K, x.stride(0), eps,
        PROLOGUE=PROLOGUES.index(prologue), HAS_BIAS=bias is not None, HAS_RES=residual is not None,
        BLOCK_M=bm, BLOCK_N=c["BLOCK_N"], BLOCK_K=c["BLOCK_K"],
        UPCAST=x.device.type != "cuda",
        ROW_K=triton.next_power_of_2(K) if (bm == 1 and prologue == "rmsnorm" and K <= 8192) else 0,
        num_warps=c["num_warps"], num_stages=c["num_stages"])
    return y
