"""Correctness checks of a case against the float64 reference, with flash-attention's rule.

For each method, ``err = max |method - ref64|`` over out and over lse; the same-dtype baseline
(the local kernel on the whole problem, on rank 0) gives ``err_base``. A method passes when
``err <= 2 * err_base + 1e-5`` for both out and lse (spec exemplars.md section 2).
"""

from __future__ import annotations

import torch

from hpcattn.kernels.merge import merge_pair
from hpcattn.kernels.reference import attn_reference

KEY_CHUNK = 16384


def reference_state(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float,
                    q_pos: torch.Tensor | None = None, k_lengths: list[int] | None = None,
                    key_chunk: int = KEY_CHUNK) -> tuple[torch.Tensor, torch.Tensor]:
    """Float64 attention state of q over k, v, in key chunks (memory O(Sq * key_chunk)).

    q (B, Sq, Hq, d); k, v (B, N, Hkv, d). ``q_pos`` (Sq,) are the rows' global positions for a
    causal mask (key j visible iff j <= q_pos[i]); None = no mask. ``k_lengths`` masks keys past
    each sequence's length. Returns out (B, Sq, Hq, d) and lse (B, Hq, Sq), float64.
    """
    B, Sq, Hq, d = q.shape
    N = k.shape[1]
    q64 = q.double()
    out = torch.zeros(B, Sq, Hq, d, dtype=torch.float64, device=q.device)
    lse = torch.full((B, Hq, Sq), float("-inf"), dtype=torch.float64, device=q.device)
    lens = torch.tensor(k_lengths, device=q.device) if k_lengths is not None else None
    for a in range(0, N, key_chunk):
        b = min(N, a + key_chunk)
        mask = None
        if q_pos is not None:
            mask = (torch.arange(a, b, device=q.device)[None, :] <= q_pos.to(q.device)[:, None])[None, None]
        cl = None if lens is None else (lens - a).clamp(0, b - a)
        o, l = attn_reference(q64, k[:, a:b].double(), v[:, a:b].double(), scale=scale, mask=mask,
                              k_lengths=cl)
        out, lse = merge_pair(out, lse, o, l)
    return out, lse


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| over finite entries of b, with matching infinities counting as 0."""
    a, b = a.double(), b.double()
    both_inf = torch.isinf(a) & torch.isinf(b) & (torch.sign(a) == torch.sign(b))
    diff = torch.where(both_inf, torch.zeros_like(a), (a - b).abs())
    if torch.isnan(diff).any():
        return float("inf")
    return float(diff.max()) if diff.numel() else 0.0


def passes(err_out: float, err_lse: float | None, base_out: float, base_lse: float) -> bool:
    """The rule for out and lse; ``err_lse`` None = a method that returns no lse (outputs only)."""
    return err_out <= 2 * base_out + 1e-5 and (err_lse is None or err_lse <= 2 * base_lse + 1e-5)
