"""The per-role work of one Lamina decode step over static buffers, for CUDA-graph capture.

hpcattn's Lamina path (:mod:`hpcattn.model.lamina`) runs **eagerly**: every op of a slice or an
attention item is a host launch, so on a GPU its per-step times are launch-bound. This module is
what a model rank and an attention rank would run per step *between exchanges* if their launches
were captured (``benchmarks/lamina_measure.py``'s graph timings; no Lamina run uses it):

* :class:`ModelRole` ``.step()``: :func:`hpcattn.model.fused_decode.decode_forward` (embedding; per
  layer the fused pre-attention - RMSNorm, wq/wk/wv, RoPE - and post-attention - wo + residual,
  RMSNorm, FFN; final norm, head) plus argmax, with no attention: the rotated q is copied into its
  send buffer ``q[layer]``, k and v are written into ``kv[layer]``, and the attention output is read
  from the receive buffer ``o[layer]``;
* :class:`AttentionRole` ``.step()``: per layer the Lean kernel with device lengths over the
  cached prefix (head-major, :class:`hpcattn.model.runner.ShardedKVCache`), the new token's LSE
  fold (:func:`hpcattn.model.lamina.fold_new_token`) into ``o[layer]`` and the append of k, v at
  the cache slot ``at`` (a device tensor, as the lengths);
* :func:`split_step`: both on one process, interleaved per layer in the exchange's order (the
  model role's attend runs the attention role's layer on the shared buffers) - one decode step of
  the whole model, which the tests check against the colocated runner.

Buffers (all static; B sequences, L layers): token (B,) int64, pos (1,) int64; q (L, B, 1, Hq, d);
kv (L, 2, B, Hkv, 1, d) (k then v, head-major like a one-slot cache); o (L, B, 1, Hq, d).
"""

from __future__ import annotations

import torch

from hpcattn.kernels import Kernel
from hpcattn.model.kv_cache import ShardedKVCache
from hpcattn.model.lamina.decoder import fold_new_token


def exchange_buffers(n_layers: int, B: int, n_heads: int, n_kv_heads: int, head_dim: int, dtype,
                     device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q, kv, o) per-layer exchange buffers of one micro-batch of B sequences (shapes above)."""
    q = torch.zeros(n_layers, B, 1, n_heads, head_dim, dtype=dtype, device=device)
    kv = torch.zeros(n_layers, 2, B, n_kv_heads, 1, head_dim, dtype=dtype, device=device)
    o = torch.zeros(n_layers, B, 1, n_heads, head_dim, dtype=dtype, device=device)
    return q, kv, o


class ModelRole:
    """A model rank's step for B sequences of ``model`` (:class:`hpcattn.model.llama.Transformer`)
    at RoPE position ``pos`` (advanced by :meth:`step` with ``advance``)."""

    def __init__(self, model, B: int, pos: int = 0, products: str = "auto"):
        a = model.args
        w = model.tok_embeddings.weight
        self.model, self.B, self.products = model, B, products
        self.token = torch.zeros(B, dtype=torch.int64, device=w.device)
        self.pos = torch.full((1,), pos, dtype=torch.int64, device=w.device)
        self._slot0 = torch.zeros(1, dtype=torch.int64, device=w.device)
        self.hidden = torch.zeros(B, a.dim, dtype=w.dtype, device=w.device)
        self.q, self.kv, self.o = exchange_buffers(a.n_layers, B, a.n_heads, a.n_kv_heads, a.head_dim, w.dtype,
                                                   w.device)

    def step(self, attend_layer=None, advance: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """One step from ``self.token``: (float32 logits (B, vocab), greedy next token (B,)).
        ``attend_layer(layer)`` (optional) runs between layer's send and receive buffers."""
        from hpcattn.model.fused_decode import decode_forward

        def attend(layer, q):
            self.q[layer].copy_(q)
            if attend_layer is not None:
                attend_layer(layer)
            return self.o[layer]

        logits = decode_forward(self.model, self.token, self.pos, slot=lambda i: (self.kv[i, 0], self.kv[i, 1]),
                                at=self._slot0, attend=attend, products=self.products)
        if advance:
            self.pos.add_(1)
        return logits, logits.argmax(-1)

    def head_step(self) -> torch.Tensor:
        """Final norm, head and argmax alone, of the static hidden state ``self.hidden`` (B, dim):
        the part of :meth:`step` that does not scale with the layer count (timing)."""
        from hpcattn.model.fused_decode import rmsnorm

        m = self.model
        return m.output(rmsnorm(self.hidden, m.norm.weight, m.norm.eps)).float().argmax(-1)


class AttentionRole:
    """An attention rank's step: ``kernel`` (Lean: device lengths) over ``cache``'s first
    ``cache.length`` tokens of every layer, for the query heads ``n_heads`` of its KV heads.

    Args:
        cache: a :class:`ShardedKVCache` (L, 2, B, Hkv, cap, d) holding the prefix (cap > length).
        exchange: (q, kv, o) buffers shared with a :class:`ModelRole` (default: fresh zeros).
    """

    def __init__(self, kernel: Kernel, cache: ShardedKVCache, n_heads: int, exchange=None):
        L, _, B, Hkv, _, d = cache.buf.shape
        self.kernel, self.cache, self.G, self.scale = kernel, cache, n_heads // Hkv, d ** -0.5
        dev = cache.buf.device
        self.klen = torch.full((B,), cache.length, dtype=torch.int32, device=dev)
        self.at = torch.full((1,), cache.length, dtype=torch.int64, device=dev)
        self.q, self.kv, self.o = exchange if exchange is not None else exchange_buffers(
            L, B, n_heads, Hkv, d, cache.buf.dtype, dev)

    def layer(self, i: int) -> None:
        """Attend q[i] to the prefix, fold in the new token kv[i], write o[i], append kv[i]."""
        kc, vc = self.cache.view(i, self.cache.capacity)         # klen says what is valid
        o, lse = self.kernel(self.q[i], kc, vc, scale=self.scale, k_lengths=self.klen)
        self.o[i].copy_(fold_new_token(self.q[i], self.kv[i].transpose(2, 3), o, lse, self.scale, self.G))
        self.cache.buf[i].index_copy_(3, self.at, self.kv[i])

    def step(self, advance: bool = True) -> torch.Tensor:
        """Every layer; with ``advance`` the appended token becomes part of the prefix. Returns o."""
        for i in range(self.cache.buf.shape[0]):
            self.layer(i)
        if advance:
            self.advance()
        return self.o

    def advance(self) -> None:
        """The appended token becomes part of the prefix (slot, device lengths, cache length)."""
        self.at.add_(1)
        self.klen.add_(1)
        self.cache.length += 1


def split_step(model_role: ModelRole, attention_role: AttentionRole) -> tuple[torch.Tensor, torch.Tensor]:
    """One decode step of both roles on shared buffers (the model role's next token in
    ``model_role.token``): (logits (B, vocab) float32, next token (B,))."""
    if attention_role.q is not model_role.q:
        raise ValueError("split_step: the roles must share their exchange buffers")
    out = model_role.step(attend_layer=attention_role.layer)
    attention_role.advance()
    return out
