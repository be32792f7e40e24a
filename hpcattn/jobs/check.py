"""Correctness checks of a case against the float64 reference, with flash-attention's rule.

For each method, ``err = max |method - ref64|`` over out and over lse; the same-dtype baseline
(the local kernel on the whole problem, on rank 0) gives ``err_base``. A method passes when
``err <= 2 * err_base + 1e-5`` for both out and lse (spec exemplars.md section 2).

Non-finite values never pass: ``max_err`` is inf for a NaN or an unmatched infinity, and an
infinite error fails whatever the baseline's error (an inf baseline error - the same-dtype kernel
itself overflowed - fails too: there is no tolerance to compare with). NaN/Inf anywhere in a
method's output (``count_nonfinite``, all rows, not only the checked ones) fails the case.
Non-finite *inputs* (an input file, checkpoint weights) are user errors, found before the run
(:func:`require_finite`, :func:`hpcattn.jobs.inputs.validate_input_file`).
"""

from __future__ import annotations

import math

import torch

from hpcattn.errors import InputError
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


def reference_state_bytes(B: int, Sq: int, Hq: int, Hkv: int, d: int, N: int, key_chunk: int = KEY_CHUNK) -> int:
    """Peak bytes :func:`reference_state` allocates for q (B, Sq, Hq, d) over N keys: the float64
    query, out/lse (two of each while merging), one key chunk of k, v in float64 (as given and
    expanded to Hq heads) and its (B, Hq, rows, chunk) scores and probabilities."""
    c = min(N, key_chunk)
    rows = min(Sq, 1024)                                   # attn_reference's q_chunk
    return 8 * (B * Sq * Hq * d + 2 * B * Sq * Hq * (d + 1) + 2 * B * c * (Hkv + Hq) * d + 2 * B * Hq * rows * c)


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b|, with matching infinities counting as 0; inf if either side has a NaN or an
    infinity the other lacks (so a non-finite output can never look accurate)."""
    a, b = a.double(), b.double()
    both_inf = torch.isinf(a) & torch.isinf(b) & (torch.sign(a) == torch.sign(b))
    diff = torch.where(both_inf, torch.zeros_like(a), (a - b).abs())
    if torch.isnan(diff).any():
        return float("inf")
    return float(diff.max()) if diff.numel() else 0.0


ABS_TOL = 1e-5


def tolerance(base_err: float) -> float:
    """The largest passing error given the same-dtype baseline's: ``2 * base_err + 1e-5``."""
    return 2 * base_err + ABS_TOL


def within(err: float, base_err: float) -> bool:
    """``err <= 2 * base_err + 1e-5`` with both finite (NaN/inf never passes): :func:`failure`'s rule."""
    return not failure("err", err, "base_err", base_err)


def failure(err_name: str, err: float | None, base_name: str, base_err: float | None) -> str:
    """Why error ``err_name`` = ``err`` fails the rule against baseline ``base_name`` = ``base_err``,
    or "" when it passes (``err`` None: not checked, e.g. the lse of a method without one)."""
    if err is None:
        return ""
    if base_err is None or not math.isfinite(base_err):
        return f"{base_name} = {base_err}: no tolerance (NaN/Inf in the same-dtype baseline)"
    if not math.isfinite(err):
        return f"{err_name} = inf (NaN/Inf where the reference is finite)"
    if err > tolerance(base_err):
        return f"{err_name} {err:.3g} > 2 * {base_name} {base_err:.3g} + {ABS_TOL:g}"
    return ""


def count_nonfinite(out: torch.Tensor, lse: torch.Tensor | None = None) -> int:
    """NaN/Inf entries of a method's output: any in ``out``, NaN or +inf in ``lse`` (-inf is the
    empty state of a row without keys)."""
    n = int((~torch.isfinite(out)).sum())
    if lse is not None:
        n += int((torch.isnan(lse) | torch.isposinf(lse)).sum())
    return n


def verdict(row: dict) -> dict:
    """``{"check_passed", "check_reason"}`` of an attention case from its error figures.

    Exact methods: ``err_out``/``err_lse`` against ``base_err_*``. Approximate ones (Star, APB:
    the row has ``query_err_out``): the exact query pass, ``query_err_*`` against
    ``query_base_err_*``. Either way ``nonfinite_out`` (NaN/Inf in the method's output, any row)
    must be 0. ``check_reason`` is "" for a pass, else every failing condition, "; "-joined."""
    q = "query_" if "query_err_out" in row else ""
    why = [failure(f"{q}err_{x}", row.get(f"{q}err_{x}"), f"{q}base_err_{x}", row.get(f"{q}base_err_{x}"))
           for x in ("out", "lse")]
    if row.get("nonfinite_out"):
        why.insert(0, f"{row['nonfinite_out']} NaN/Inf in the output")
    why = [w for w in why if w]
    return {"check_passed": not why, "check_reason": "; ".join(why)}


# -- inputs must be finite -----------------------------------------------------------------------

def require_finite(t: torch.Tensor, what: str) -> None:
    """Raise InputError naming ``what`` when ``t`` holds a NaN or an infinity."""
    bad = ~torch.isfinite(t)
    n = int(bad.sum())
    if n:
        first = tuple(int(i) for i in bad.nonzero()[0].tolist())
        raise InputError(f"{what} holds {n} NaN/Inf value(s) (first at index {first}); inputs must be finite")
