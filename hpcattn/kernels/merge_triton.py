"""Fused merge of all-gathered attention states in one Triton kernel (tree decode's merge).

The all-gather merge of :func:`hpcattn.kernels.merge.merge_states`, written as ~15 small torch ops,
costs more in kernel launches than in work for a decode step (measured on 2x H200: the merge phase
of a B=1 tree decode step took 0.3-0.6 ms, docs/performance.md). This kernel does the same
arithmetic - guarded for empty shards (lse = -inf) - in one launch and writes the output in the
caller's dtype.

    buf: (P, R, d + 1) float32, contiguous: P ranks' packed [out | lse] rows (pack_states layout)
    -> out (R, d) in ``out_dtype``, lse (R,) float32
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


@triton.jit
def _merge_kernel(BUF, OUT, LSE, R, D: tl.constexpr, P: tl.constexpr, BLOCK_R: tl.constexpr,
                  BLOCK_D: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < R
    dd = tl.arange(0, BLOCK_D)
    dmask = dd < D
    stride_p = R * (D + 1)
    m = tl.full([BLOCK_R], float("-inf"), tl.float32)
    for i in tl.static_range(P):
        lse_i = tl.load(BUF + i * stride_p + rows * (D + 1) + D, mask=rmask, other=float("-inf"))
        m = tl.maximum(m, lse_i)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    den = tl.zeros([BLOCK_R], tl.float32)
    num = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)
    for i in tl.static_range(P):
        lse_i = tl.load(BUF + i * stride_p + rows * (D + 1) + D, mask=rmask, other=float("-inf"))
        w = tl.exp(lse_i - m_safe)                                   # 0 for empty shards
        o = tl.load(BUF + i * stride_p + rows[:, None] * (D + 1) + dd[None, :],
                    mask=rmask[:, None] & dmask[None, :], other=0.0)
        num += w[:, None] * o
        den += w
    safe = tl.where(den == 0.0, 1.0, den)
    out = num / safe[:, None]
    lse = tl.where(den == 0.0, float("-inf"), m_safe + tl.log(safe))
    tl.store(OUT + rows[:, None] * D + dd[None, :], out.to(OUT.dtype.element_ty),
             mask=rmask[:, None] & dmask[None, :])
    tl.store(LSE + rows, lse, mask=rmask)


def merge_gathered(buf: torch.Tensor, out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge P packed states: buf (P, R, d+1) float32 -> (out (R, d) out_dtype, lse (R,) float32)."""
    if buf.dtype != torch.float32 or buf.dim() != 3 or not buf.is_contiguous():
        raise ValueError(f"merge_gathered needs a contiguous float32 (P, R, d+1) buffer, got "
                         f"{buf.dtype} {tuple(buf.shape)}")
    P, R, d1 = buf.shape
    d = d1 - 1
    out = torch.empty(R, d, dtype=out_dtype, device=buf.device)
    lse = torch.empty(R, dtype=torch.float32, device=buf.device)
    block_d = triton.next_power_of_2(d)
    block_r = max(1, min(64, 4096 // block_d))
    _merge_kernel[(triton.cdiv(R, block_r),)](buf, out, lse, R, D=d, P=P, BLOCK_R=block_r, BLOCK_D=block_d)
    return out, lse


def available(t: torch.Tensor) -> bool:
    """True where the fused kernel can run: CUDA tensors (or Triton's CPU interpreter)."""
    return t.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"
