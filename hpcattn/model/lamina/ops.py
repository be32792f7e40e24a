"""Lamina's per-slice ops on a finished model: the model rank's projections and layer finish, the
attention rank's fold of the new token and its append to the cache. Shared by the eager decoder
(:mod:`hpcattn.model.lamina.decoder`) and the captured role steps (:mod:`hpcattn.model.lamina.steps`).
"""

from __future__ import annotations

import torch

from hpcattn.kernels import merge_pair
from hpcattn.model.llama import apply_rope


def project_q(model, layer: int, h: torch.Tensor, cos, sin) -> torch.Tensor:
    """Post-RoPE q (B, 1, Hq, d) of the normed hidden h (B, 1, dim); cos/sin (S, d) or (B, 1, d)."""
    a = model.args
    return apply_rope(model.layers[layer].attention.wq(h).view(h.shape[0], 1, a.n_heads, a.head_dim), cos, sin)


def project_kv(model, layer: int, h: torch.Tensor, cos, sin) -> tuple[torch.Tensor, torch.Tensor]:
    """Post-RoPE k and v (B, 1, Hkv, d) of the normed hidden h (B, 1, dim)."""
    a, att = model.args, model.layers[layer].attention
    B = h.shape[0]
    return (apply_rope(att.wk(h).view(B, 1, a.n_kv_heads, a.head_dim), cos, sin),
            att.wv(h).view(B, 1, a.n_kv_heads, a.head_dim))


def finish_layer(model, layer: int, x: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
    """Output projection, residual and FFN of ``layer`` (as :class:`hpcattn.model.llama.Block`):
    x (B, 1, dim), o (B, 1, Hq, d) -> x (B, 1, dim)."""
    blk = model.layers[layer]
    x = x + blk.attention.wo(o.reshape(x.shape[0], 1, -1))
    return x + blk.feed_forward(blk.ffn_norm(x))


def fold_new_token(q, kv, o_prev, lse_prev, scale: float, G: int) -> torch.Tensor:
    """Merge the cached prefix's state with the new token's own state (out = v_new, lse = scale
    q.k_new; spec section 5.3, in LSE form): q (B, 1, h*G, d), kv (2, B, 1, h, d), o_prev
    (B, 1, h*G, d), lse_prev (B, h*G, 1) -> out (B, 1, h*G, d) in q's dtype."""
    acc = lse_prev.dtype
    k_new = kv[0].repeat_interleave(G, dim=2).to(acc)             # (B, 1, h*G, d)
    v_new = kv[1].repeat_interleave(G, dim=2)
    s_new = (q.to(acc) * k_new).sum(-1).transpose(1, 2) * scale   # (B, h*G, 1)
    out, _ = merge_pair(o_prev, lse_prev, v_new, s_new)
    return out.to(q.dtype).contiguous()


def append_new_token(buf: torch.Tensor, kv: torch.Tensor, rows, slots) -> None:
    """Store the new token's k, v (2, Bj, 1, h, d) in one layer's head-major cache buf
    (2, B, h, cap, d): sequence rows[i] at token slot slots[i]. ``rows``: a range of B or a (Bj,)
    int64 device tensor; ``slots``: a list or a (Bj,) int64 device tensor (captured steps: no host
    data)."""
    dev = buf.device
    r = rows if isinstance(rows, torch.Tensor) else torch.arange(rows.start, rows.stop, device=dev)
    at = slots if isinstance(slots, torch.Tensor) else torch.tensor(slots, device=dev)
    buf[0, r, :, at] = kv[0, :, 0]
    buf[1, r, :, at] = kv[1, :, 0]
