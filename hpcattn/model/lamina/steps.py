"""The per-role work of a Lamina decode step over static buffers, for CUDA-graph capture.

What a model rank and an attention rank run *between two exchanges*, over static buffers (device
lengths, slots and positions), so that each piece is captured once and replayed every step:

* :class:`ModelSlices`: a model rank's slices of one micro-batch, one per layer (Lamina's graph
  mode, :class:`hpcattn.model.lamina.LaminaDecoder`);
* :class:`AttentionRole` ``.layer()``: an attention rank's item of one micro-batch and layer (the
  graph mode's attention pieces, and ``.step()``: every layer, ``benchmarks/lamina_measure.py``'s
  graph ATIME);
* :class:`ModelRole` ``.step()`` (the benchmark's graph MTIME, one piece for the whole step):
  :func:`hpcattn.model.fused_decode.decode_forward` (embedding; per
  layer the fused pre-attention - RMSNorm, wq/wk/wv, RoPE - and post-attention - wo + residual,
  RMSNorm, FFN; final norm, head) plus argmax, with no attention: the rotated q is copied into its
  send buffer ``q[layer]``, k and v are written into ``kv[layer]``, and the attention output is read
  from the receive buffer ``o[layer]``;
* per layer (:class:`AttentionRole`) the Lean kernel with device lengths over the
  cached prefix (head-major, :class:`hpcattn.model.runner.ShardedKVCache`), the new token's LSE
  fold (:func:`hpcattn.model.lamina.fold_new_token`) into ``o[layer]`` and the append of k, v at
  the cache slot ``at`` (a device tensor, as the lengths);
* :func:`split_step`: both on one process, interleaved per layer in the exchange's order (the
  model role's attend runs the attention role's layer on the shared buffers) - one decode step of
  the whole model, which the tests check against the colocated runner.

ModelRole's buffers (all static; B sequences, L layers): token (B,) int64, pos (1,) int64; q (L, B, 1, Hq, d);
kv (L, 2, B, 1, Hkv, d) (k then v: the Lamina message layout); o (L, B, 1, Hq, d).
"""

from __future__ import annotations

import torch

from hpcattn.kernels import Kernel
from hpcattn.model.kv_cache import ShardedKVCache
from hpcattn.model.lamina.ops import append_new_token, fold_new_token


def exchange_buffers(n_layers: int, B: int, n_heads: int, n_kv_heads: int, head_dim: int, dtype,
                     device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q, kv, o) per-layer exchange buffers of one micro-batch of B sequences (shapes above: the
    Lamina messages' layouts)."""
    q = torch.zeros(n_layers, B, 1, n_heads, head_dim, dtype=dtype, device=device)
    kv = torch.zeros(n_layers, 2, B, 1, n_kv_heads, head_dim, dtype=dtype, device=device)
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

        logits = decode_forward(self.model, self.token, self.pos,
                                slot=lambda i: (self.kv[i, 0].transpose(1, 2), self.kv[i, 1].transpose(1, 2)),
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


class ModelSlices:
    """A model rank's work for one Lamina micro-batch of Bj sequences, cut at the exchanges: each
    piece is what runs between receiving layer k-1's attention output and sending layer k's q, k,
    v (:meth:`slice`), over static buffers, so that :class:`hpcattn.graph.StepGraph` can capture it
    once and replay it every step. The ops are the captured colocated step's
    (:mod:`hpcattn.model.fused_decode`: fused q/k/v and gate/up products, RoPE fused with the k/v
    store, residuals folded into the products).

    Args:
        model: the :class:`hpcattn.model.llama.Transformer`; Bj: rows of the micro-batch.
        attention_ranks: A; attention rank a gets query heads [a*Hq/A, (a+1)*Hq/A) and KV heads
            [a*Hkv/A, (a+1)*Hkv/A).
        products: ``auto`` | ``gemv`` | ``torch`` (:func:`hpcattn.model.fused_decode.decode_forward`).

    Static buffers (qh = Hq/A, h = Hkv/A): token (Bj,) int64, the last sampled token; base (Bj,)
    int64, the rows' prompt lengths; pos (Bj,) int64, each row's RoPE position (ragged prompts: one
    per row; token t of the generation is at base + t); cos, sin (Bj, d); x (Bj, dim),
    the residual stream; q (L, Bj, 1, Hq, d) and kv (L, 2, Bj, 1, Hkv, d), what layer k sends;
    q_out[k][a] (Bj, 1, qh, d) and kv_out[k][a] (2, Bj, 1, h, d), the contiguous pieces sent to
    attention rank a (views of q[k], kv[k] when A = 1); o_in (L, A, Bj, 1, qh, d), the pieces of
    layer k's attention output received from each attention rank.
    """

    def __init__(self, model, Bj: int, attention_ranks: int, products: str = "auto",
                 prompt_lengths: list[int] | None = None):
        from hpcattn.model.fused_decode import step_products

        a = model.args
        w = model.tok_embeddings.weight
        dev, dt = w.device, w.dtype
        A, L, d = attention_ranks, a.n_layers, a.head_dim
        qh, h = a.n_heads // A, a.n_kv_heads // A
        self.model, self.Bj, self.A = model, Bj, A
        self.rope_dtype = torch.float64 if dt == torch.float64 else torch.float32
        self.token = torch.zeros(Bj, dtype=torch.int64, device=dev)
        self.base = torch.tensor(prompt_lengths or [0] * Bj, dtype=torch.int64, device=dev)
        self.pos = self.base.clone()
        self.t: int | None = None             # host bookkeeping: the token pos, cos and sin are at
        self.cos = torch.zeros(Bj, d, dtype=self.rope_dtype, device=dev)
        self.sin = torch.zeros(Bj, d, dtype=self.rope_dtype, device=dev)
        self.x = torch.zeros(Bj, a.dim, dtype=dt, device=dev)
        self.q, self.kv, _ = exchange_buffers(L, Bj, a.n_heads, a.n_kv_heads, d, dt, dev)
        self.o_in = torch.zeros(L, A, Bj, 1, qh, d, dtype=dt, device=dev)
        if A == 1:
            self.q_out = [[self.q[k]] for k in range(L)]
            self.kv_out = [[self.kv[k]] for k in range(L)]
        else:
            self.q_out = [[torch.zeros(Bj, 1, qh, d, dtype=dt, device=dev) for _ in range(A)] for _ in range(L)]
            self.kv_out = [[torch.zeros(2, Bj, 1, h, d, dtype=dt, device=dev) for _ in range(A)] for _ in range(L)]
        self._heads = [((ai * qh, (ai + 1) * qh), (ai * h, (ai + 1) * h)) for ai in range(A)]
        self._slot0 = torch.zeros(1, dtype=torch.int64, device=dev)
        self.prods = step_products(model, self.x, products)

    def state(self) -> list[torch.Tensor]:
        """The buffers a call changes that a later call reads (what a capture's warm-up must undo)."""
        return [self.token, self.pos, self.cos, self.sin, self.x]

    def _pre(self, k: int) -> None:
        """Layer k's q, k, v of x into q[k], kv[k] and the per-rank pieces."""
        from hpcattn.model.fused_decode import pre_attention

        kv = self.kv[k]
        pre_attention(self.model, k, self.x, self.cos, self.sin, (kv[0].transpose(1, 2), kv[1].transpose(1, 2)),
                      self._slot0, self.prods, out=self.q[k])
        if self.A > 1:
            for ai, ((qlo, qhi), (lo, hi)) in enumerate(self._heads):
                self.q_out[k][ai].copy_(self.q[k][:, :, qlo:qhi])
                self.kv_out[k][ai].copy_(kv[:, :, :, lo:hi])

    def _post(self, k: int) -> torch.Tensor:
        """Layer k's output projection, residual and FFN of x and the received o_in[k] -> new x."""
        from hpcattn.model.fused_decode import post_attention

        o = self.o_in[k]                                   # (A, Bj, 1, qh, d) -> (Bj, 1, Hq, d)
        o = o[0] if self.A == 1 else o.permute(1, 2, 0, 3, 4).reshape(self.Bj, 1, -1, o.shape[-1])
        return post_attention(self.model, k, self.x, o, self.prods)

    def _head(self, x: torch.Tensor) -> torch.Tensor:
        from hpcattn.model.fused_decode import head

        logits = head(self.model, x, self.prods)
        self.token.copy_(logits.argmax(-1))
        return logits

    def _rope(self) -> None:
        cos, sin = self.model.rope(self.pos, self.rope_dtype)
        self.cos.copy_(cos)
        self.sin.copy_(sin)

    def position(self, t: int) -> None:
        """Every row at token t of the generation: pos = base + t and its cos/sin (eager: a model
        rank that continues a micro-batch another model rank started, rotation)."""
        torch.add(self.base, t, out=self.pos)
        self._rope()

    def begin(self) -> None:
        """Embed ``token`` at ``pos`` (RoPE cos/sin per row) and run layer 0's pre-attention."""
        self._rope()
        self.x.copy_(torch.nn.functional.embedding(self.token, self.model.tok_embeddings.weight))
        self._pre(0)

    def slice(self, k: int) -> torch.Tensor | None:
        """The work between two exchanges ending with layer k's sends: k >= 1, layer k-1's
        post-attention and layer k's pre-attention; k = 0, the last layer's post-attention, the
        head and the greedy token (returns its float32 logits (Bj, vocab)), the next position,
        its embedding and layer 0's pre-attention."""
        L = self.model.args.n_layers
        x = self._post((k - 1) % L)
        if k > 0:
            self.x.copy_(x)
            self._pre(k)
            return None
        logits = self._head(x)
        self.pos.add_(1)
        self.begin()
        return logits

    def last(self) -> torch.Tensor:
        """The last slice of a generation: the last layer's post-attention, head and greedy token
        (no next token to embed); returns the float32 logits (Bj, vocab)."""
        return self._head(self._post(self.model.args.n_layers - 1))


class AttentionRole:
    """An attention rank's step for the cache rows [b0, b1) (default: all), Bj = b1 - b0 sequences:
    ``kernel`` (Lean: device lengths) over each row's prefix, for the query heads ``n_heads`` of
    the cache's KV heads.

    Args:
        cache: a :class:`ShardedKVCache` (L, 2, B, Hkv, cap, d) holding the prefix (cap > length).
        exchange: (q, kv, o) buffers shared with a :class:`ModelRole` (default: fresh zeros, the
            shapes of :func:`exchange_buffers` for Bj rows).
        rows: (b0, b1), the cache rows (sequences) this role serves (a Lamina micro-batch).
        prefix: (Bj,) each row's prefix length (ragged prompts; default ``cache.length`` for all).

    Device state (advanced by :meth:`advance`, never read by the host): klen (Bj,) int32, the
    prefix lengths the kernel reads; at (Bj,) int64, each row's slot for the new token.
    """

    def __init__(self, kernel: Kernel, cache: ShardedKVCache, n_heads: int, exchange=None,
                 rows: tuple[int, int] | None = None, prefix: list[int] | None = None):
        L, _, B, Hkv, _, d = cache.buf.shape
        self.b0, self.b1 = rows if rows is not None else (0, B)
        Bj = self.b1 - self.b0
        self.kernel, self.cache, self.G, self.scale = kernel, cache, n_heads // Hkv, d ** -0.5
        dev = cache.buf.device
        prefix = prefix if prefix is not None else [cache.length] * Bj
        self.klen = torch.tensor(prefix, dtype=torch.int32, device=dev)
        self.at = torch.tensor(prefix, dtype=torch.int64, device=dev)
        self.row_index = torch.arange(self.b0, self.b1, device=dev)
        self.q, self.kv, self.o = exchange if exchange is not None else exchange_buffers(
            L, Bj, n_heads, Hkv, d, cache.buf.dtype, dev)

    def layer(self, i: int) -> None:
        """Attend q[i] to the prefix, fold in the new token kv[i], write o[i], append kv[i] at slot at."""
        kc, vc = self.cache.view(i, self.cache.capacity)         # klen says what is valid
        kc, vc = kc[self.b0:self.b1], vc[self.b0:self.b1]
        o, lse = self.kernel(self.q[i], kc, vc, scale=self.scale, k_lengths=self.klen)
        self.o[i].copy_(fold_new_token(self.q[i], self.kv[i], o, lse, self.scale, self.G))
        append_new_token(self.cache.buf[i], self.kv[i], self.row_index, self.at)

    def step(self, advance: bool = True) -> torch.Tensor:
        """Every layer; with ``advance`` the appended token becomes part of the prefix. Returns o."""
        for i in range(self.cache.buf.shape[0]):
            self.layer(i)
        if advance:
            self.advance()
            self.cache.length += 1
        return self.o

    def advance(self) -> None:
        """The appended token becomes part of every row's prefix (device lengths and slots only)."""
        self.at.add_(1)
        self.klen.add_(1)

    def set_prefix(self, prefix: list[int]) -> None:
        """Each row's prefix length (Bj,) (a new generation; outside any capture)."""
        self.klen.copy_(torch.tensor(prefix, dtype=torch.int32))
        self.at.copy_(torch.tensor(prefix, dtype=torch.int64))


def split_step(model_role: ModelRole, attention_role: AttentionRole) -> tuple[torch.Tensor, torch.Tensor]:
    """One decode step of both roles on shared buffers (the model role's next token in
    ``model_role.token``): (logits (B, vocab) float32, next token (B,))."""
    if attention_role.q is not model_role.q:
        raise ValueError("split_step: the roles must share their exchange buffers")
    out = model_role.step(attend_layer=attention_role.layer)
    attention_role.advance()
    attention_role.cache.length += 1
    return out
