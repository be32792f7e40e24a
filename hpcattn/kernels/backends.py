"""Adapters from each attention kernel to hpcattn's ``(out, lse)`` convention.

Performance note: the aten ops take (B, H, S, d). hpcattn tensors are (B, S, H, d) *views*; when
they are physically head-major (see :func:`hpcattn.kernels.head_major`) the transposes below are
free, otherwise the op copies its input (for a decode step that copy costs more than the kernel).

Every backend function here has the signature of :func:`hpcattn.kernels.attn_with_lse` minus the
backend name, and returns::

    out: (B, Sq, Hq, d) in q.dtype          lse: (B, Hq, Sq) float32, natural log, scale included

The adapter hides the backends' differences (spec kernels.md section 1): it transposes layouts,
squeezes cuDNN's trailing LSE dim, slices the efficient op's padded LSE, emulates bottom-right
causal on top-left kernels (two calls and a merge), folds GQA query heads into rows for non-causal
calls (so each KV head is read once and KV is never expanded), expands KV heads only for causal
calls on kernels that cannot do GQA, and maps +inf "no key" LSEs to -inf. A call with zero keys
never reaches a kernel: it returns the empty state.
"""

from __future__ import annotations

from typing import Callable

import torch

from hpcattn.kernels.merge import empty_state, merge_pair, sanitize_lse
from hpcattn.kernels.reference import attn_reference, causal_offset

# A raw kernel in (B, H, S, d) layout with H equal for q, k, v: (q, k, v, is_causal, scale) ->
# (out (B, H, Sq, d), lse (B, H, Sq)); is_causal is top-left aligned (the aten convention).
RawKernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, bool, float], tuple]


def _aten_cudnn(q, k, v, is_causal, scale):
    r = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, is_causal,
                                                           False, scale=scale)
    lse = r[1]
    return r[0], (lse.squeeze(-1) if lse.dim() == 4 else lse)


def _aten_flash(q, k, v, is_causal, scale):
    r = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, is_causal, False, scale=scale)
    return r[0], r[1]


def _aten_efficient(q, k, v, is_causal, scale):
    r = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, True, 0.0, is_causal,
                                                               scale=scale)
    return r[0], r[1][..., : q.shape[2]]       # LSE is padded to a multiple of 32: slice it


def _cpu_flash(q, k, v, is_causal, scale):
    r = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, is_causal, scale=scale)
    return r[0], r[1]


RAW_KERNELS: dict[str, RawKernel] = {
    "aten_cudnn": _aten_cudnn,
    "aten_flash": _aten_flash,
    "aten_efficient": _aten_efficient,
    "cpu_flash": _cpu_flash,
}


def _call_raw(raw: RawKernel, q, k, v, is_causal: bool, scale: float, native_gqa: bool):
    """Flash-layout call of a raw (B, H, S, d) kernel, handling GQA. No masking beyond is_causal."""
    B, Sq, Hq, d = q.shape
    Hkv = k.shape[2]
    g = Hq // Hkv
    if g > 1 and native_gqa:
        # measured (H200, cuDNN 9.19, decode 1M tokens): native GQA 0.97 ms, fold 12 ms - the
        # folded call gets only B*Hkv thread blocks. So native GQA whenever the kernel has it.
        o, lse = raw(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal, scale)
        return o.transpose(1, 2), lse
    if g > 1 and not is_causal:
        # Fold the g query heads of each KV head into the row dimension, rows ordered (g, s):
        # exact without a mask, each KV head read once, and free (no copy) for head-major q.
        qf = q.transpose(1, 2).reshape(B, Hkv, g * Sq, d)
        o, lse = raw(qf, k.transpose(1, 2), v.transpose(1, 2), False, scale)
        return o.reshape(B, Hq, Sq, d).transpose(1, 2), lse.reshape(B, Hq, Sq)
    kt, vt = k.transpose(1, 2), v.transpose(1, 2)
    if g > 1 and not native_gqa:
        kt, vt = kt.repeat_interleave(g, dim=1), vt.repeat_interleave(g, dim=1)
    o, lse = raw(q.transpose(1, 2), kt, vt, is_causal, scale)
    return o.transpose(1, 2), lse


def raw_attention(raw: RawKernel, q, k, v, *, causal: str, scale: float,
                  native_gqa: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, lse)`` from a top-left-causal raw kernel, for any hpcattn causal mode (equal lengths)."""
    B, Sq, Hq, d = q.shape
    Sk = k.shape[1]
    off = causal_offset(causal, Sq, Sk)
    if off is None:
        out, lse = _call_raw(raw, q, k, v, False, scale, native_gqa)
    elif off == 0:
        out, lse = _call_raw(raw, q, k, v, True, scale, native_gqa)
    elif off > 0:
        # bottom-right: every row sees the prefix K[:off]; the tail is square causal (kernels.md s5)
        o1, l1 = _call_raw(raw, q, k[:, :off], v[:, :off], False, scale, native_gqa)
        o2, l2 = _call_raw(raw, q, k[:, off:], v[:, off:], True, scale, native_gqa)
        o, l = merge_pair(o1, sanitize_lse(l1.float()), o2, sanitize_lse(l2.float()))
        return o.to(q.dtype), l
    else:
        # Sq > Sk bottom-right: the first -off rows see nothing; the rest are square causal.
        out, lse = empty_state(B, Sq, Hq, d, dtype=q.dtype, device=q.device)
        o2, l2 = _call_raw(raw, q[:, -off:], k, v, True, scale, native_gqa)
        out[:, -off:] = o2
        lse[:, :, -off:] = l2.float()
    return out, sanitize_lse(lse.float())


def fa2_attention(q, k, v, *, causal: str, scale: float, native_gqa: bool = True):
    """flash-attn 2/3 public API (bottom-right causal natively, GQA natively)."""
    import flash_attn  # optional extra

    off = causal_offset(causal, q.shape[1], k.shape[1])
    r = flash_attn.flash_attn_func(q, k, v, softmax_scale=scale, causal=off is not None,
                                   return_attn_probs=True)
    out, lse = r[0], r[1]                      # FA2 returns 3 values, FA3 2: unpack defensively
    return out, sanitize_lse(lse.float())


def ref_attention(q, k, v, *, causal: str, scale: float, native_gqa: bool = True):
    out, lse = attn_reference(q, k, v, scale=scale, causal=causal)
    return out, lse if lse.dtype == torch.float64 else lse.float()
