"""Reference attention in plain torch math: the ground truth of every correctness test.

Layouts (hpcattn's one convention, flash layout):
    q: (B, Sq, Hq, d)    k, v: (B, Sk, Hkv, d)    Hq % Hkv == 0
    out: (B, Sq, Hq, d) in q.dtype
    lse: (B, Hq, Sq), natural log, softmax scale included; float32 (float64 for float64 inputs);
         -inf (and out = 0) for a row that sees no key.
"""

from __future__ import annotations

import torch

CAUSAL_MODES = ("none", "square", "bottom_right")


def causal_offset(causal: str, sq: int, sk: int) -> int | None:
    """Key j is visible to query row i iff j <= i + offset; None means no causal mask.

    ``square`` is the standard mask (needs Sq == Sk, offset 0); ``bottom_right`` aligns the last
    query row with the last key (offset Sk - Sq), as flash-attn does for Sq != Sk.
    """
    if causal == "none":
        return None
    if causal == "square":
        if sq != sk:
            raise ValueError(f"causal='square' needs Sq == Sk, got Sq={sq}, Sk={sk}")
        return 0
    if causal == "bottom_right":
        return sk - sq
    raise ValueError(f"causal must be one of {CAUSAL_MODES}, got {causal!r}")


def attn_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float,
                   causal: str = "none", mask: torch.Tensor | None = None,
                   k_lengths: torch.Tensor | None = None,
                   q_chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact attention state ``(out, lse)`` computed in float32 (float64 for float64 inputs).

    Args:
        q, k, v: see the module docstring.
        scale: softmax scale tau (lse includes it).
        causal: ``none`` | ``square`` | ``bottom_right`` (see :func:`causal_offset`).
        mask: optional explicit boolean mask, True = visible, broadcastable to (B, Hq, Sq, Sk);
            combined with ``causal`` and ``k_lengths``.
        k_lengths: optional (B,) int tensor; keys j >= k_lengths[b] are invisible (ragged batch).
        q_chunk: rows per chunk, to bound memory at O(q_chunk * Sk) per head.
    """
    B, Sq, Hq, d = q.shape
    Sk, Hkv = k.shape[1], k.shape[2]
    if Hq % Hkv:
        raise ValueError(f"Hq={Hq} is not a multiple of Hkv={Hkv}")
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    g = Hq // Hkv
    kf = k.to(acc).repeat_interleave(g, dim=2)                      # (B, Sk, Hq, d)
    vf = v.to(acc).repeat_interleave(g, dim=2)
    off = causal_offset(causal, Sq, Sk)
    out = torch.empty(B, Sq, Hq, d, dtype=acc, device=q.device)
    lse = torch.empty(B, Hq, Sq, dtype=acc, device=q.device)
    kpos = torch.arange(Sk, device=q.device)
    for s0 in range(0, Sq, q_chunk):
        s1 = min(Sq, s0 + q_chunk)
        s = torch.einsum("bqhd,bkhd->bhqk", q[:, s0:s1].to(acc), kf) * scale
        keep = torch.ones(1, 1, s1 - s0, Sk, dtype=torch.bool, device=q.device)
        if off is not None:
            qpos = torch.arange(s0, s1, device=q.device)
            keep = keep & (kpos[None, :] <= qpos[:, None] + off)
        if k_lengths is not None:
            keep = keep & (kpos.view(1, 1, 1, Sk) < k_lengths.view(B, 1, 1, 1).to(q.device))
        if mask is not None:
            keep = keep & mask[..., s0:s1, :]
        s = s.masked_fill(~keep, float("-inf"))
        l = torch.logsumexp(s, dim=-1) if Sk else torch.full(s.shape[:-1], float("-inf"), dtype=acc,
                                                             device=q.device)
        p = torch.exp(s - torch.where(torch.isinf(l), torch.zeros_like(l), l)[..., None])
        out[:, s0:s1] = torch.einsum("bhqk,bkhd->bqhd", p, vf)
        lse[:, :, s0:s1] = l
    lse_dtype = torch.float64 if acc == torch.float64 else torch.float32
    return out.to(q.dtype), lse.to(lse_dtype)
