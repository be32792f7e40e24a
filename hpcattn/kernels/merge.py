"""The one place where partial attention states are merged (spec README sections 2, 3, 6, 7).

A state of a query row over a key set is ``(out, lse)`` with out normalised and lse the natural-log
sum of exp(scores). Layouts: out (B, Sq, H, d), lse (B, H, Sq). The canonical empty state is
(out = 0, lse = -inf); every function here keeps it NaN-free. Accumulation is float32 (float64 when
an input is float64); callers cast to the model dtype once at the end.
"""

from __future__ import annotations

import torch

NEG_INF = float("-inf")


def acc_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 if any input is float64, else float32."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def lse_as_out(lse: torch.Tensor) -> torch.Tensor:
    """(B, H, Sq) -> (B, Sq, H, 1): broadcastable against out (B, Sq, H, d) for any B.

    This explicit reshape is the fix of the public tree-decode code's batch>1 broadcast bug.
    """
    return lse.transpose(1, 2).unsqueeze(-1)


def empty_state(B: int, Sq: int, H: int, d: int, *, dtype: torch.dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
    """The state of a row that sees no key: out = 0 in ``dtype``, lse = -inf in float32."""
    return (torch.zeros(B, Sq, H, d, dtype=dtype, device=device),
            torch.full((B, H, Sq), NEG_INF, dtype=torch.float32, device=device))


def sanitize_lse(lse: torch.Tensor) -> torch.Tensor:
    """Map a kernel's +inf/NaN 'no key' marker to -inf (flash-attn 2's non-split path writes +inf)."""
    bad = torch.isposinf(lse) | torch.isnan(lse)
    return torch.where(bad, torch.full_like(lse, NEG_INF), lse)


def safe_max(m: torch.Tensor) -> torch.Tensor:
    """The common max with -inf (no key anywhere) replaced by 0, so exp(lse - m) is 0, not NaN."""
    return torch.where(torch.isneginf(m), torch.zeros_like(m), m)


def finish_sum(num: torch.Tensor, den: torch.Tensor, m_safe: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """num = sum w*out (B, Sq, H, d), den = sum w (B, H, Sq), w = exp(lse - m_safe) -> (out, lse);
    rows with den = 0 become the empty state (0, -inf)."""
    safe = torch.where(den == 0, torch.ones_like(den), den)
    lse = torch.where(den == 0, torch.full_like(den, NEG_INF), m_safe + torch.log(safe))
    return num / lse_as_out(safe), lse


def merge_states(outs: torch.Tensor, lses: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """All-at-once merge of R states stacked on dim 0.

    Args:
        outs: (R, B, Sq, H, d), any float dtype.
        lses: (R, B, H, Sq).
    Returns:
        out (B, Sq, H, d) and lse (B, H, Sq), both in the accumulation dtype.
    """
    acc = acc_dtype(outs, lses)
    lses = lses.to(acc)
    m_safe = safe_max(lses.amax(dim=0))
    w = torch.exp(lses - m_safe)                                   # (R, B, H, Sq), 0 for empty
    num = (outs.to(acc) * w.transpose(2, 3).unsqueeze(-1)).sum(dim=0)
    return finish_sum(num, w.sum(dim=0), m_safe)


def merge_pair(out: torch.Tensor, lse: torch.Tensor, out_b: torch.Tensor,
               lse_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold block state (out_b, lse_b) into accumulator (out, lse); returns the new accumulator.

    Uses ``logaddexp`` (never the overflowing ``log(1 + exp(.))`` spelling). Either side may be
    empty (lse = -inf) without producing NaN. out is (B, Sq, H, d), lse (B, H, Sq); the result is
    in the accumulation dtype.
    """
    acc = acc_dtype(out, lse, out_b, lse_b)
    lse, lse_b = lse.to(acc), lse_b.to(acc)
    new = torch.logaddexp(lse, lse_b)
    new_safe = safe_max(new)
    wa = lse_as_out(torch.exp(lse - new_safe))
    wb = lse_as_out(torch.exp(lse_b - new_safe))
    return out.to(acc) * wa + out_b.to(acc) * wb, new


def pack_states(out: torch.Tensor, lse: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Pack a state into one contiguous float buffer of shape (B*H*Sq, d + 1).

    Row order is (B, H, Sq), matching lse. With ``weight`` (B, H, Sq), packs ``[w * out | w]``
    (the SUM payload of the all-reduce merge); otherwise ``[out | lse]`` (the all-gather payload).
    """
    acc = acc_dtype(out, lse)
    B, Sq, H, d = out.shape
    buf = torch.empty(B, H, Sq, d + 1, dtype=acc, device=out.device)
    o = out.transpose(1, 2).to(acc)                                 # (B, H, Sq, d)
    if weight is None:
        buf[..., :d] = o
        buf[..., d] = lse
    else:
        buf[..., :d] = o * weight.unsqueeze(-1)
        buf[..., d] = weight
    return buf.view(B * H * Sq, d + 1)


def unpack_states(buf: torch.Tensor, B: int, Sq: int, H: int, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`pack_states` for a buffer of (..., B*H*Sq, d+1): (out (..., B,Sq,H,d), last (..., B,H,Sq))."""
    lead = buf.shape[:-2]
    b = buf.view(*lead, B, H, Sq, d + 1)
    return b[..., :d].transpose(-3, -2), b[..., d]


def normalize_sum(num_den: torch.Tensor, m_safe: torch.Tensor, B: int, Sq: int, H: int,
                  d: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Finish the all-reduce merge: ``[sum w*out | sum w]`` and the common max -> (out, lse)."""
    return finish_sum(*unpack_states(num_den, B, Sq, H, d), m_safe)
