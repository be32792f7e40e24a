"""Distributed inference with a sharded KV cache: prefill by ``local``, ``ring``, ``star`` or
``apb`` (the last two in :mod:`hpcattn.model.approx_prefill`), decode by ``local``, ``tree`` or
``ring``, chosen per run and applied in every layer.

* Prefill ``ring``: rank r runs all layers on its shard of the prompt (zigzag or contiguous, with
  the tokens' true positions); attention is ring attention; its KV stays in its cache.
* Prefill ``local``: every rank runs the whole prompt (the single-device baseline); with a
  distributed decode each rank keeps only its contiguous shard of the KV afterwards.
* Decode: every rank embeds the same token and computes the same q, k, v (the non-attention layers
  are replicated, as in Star Attention and APB); the new token's KV is appended on the last rank
  (``kv_placement: last``, as the papers do) or round-robin; attention is tree decode (exact merge of
  the shards' states), KV-rotating ring decode, or local over a full cache.

Every rank ends each step with identical logits; the greedy token is broadcast from rank 0 anyway,
so ranks can never drift apart.
"""

from __future__ import annotations

import torch

from hpcattn.kernels import Kernel
from hpcattn.methods import ring_decode, ring_prefill, tree_decode
from hpcattn.methods.sharding import contiguous_bounds, layout_indices
from hpcattn.model.llama import Transformer


class ShardedKVCache:
    """This rank's post-RoPE K and V for every layer, head-major: buf (L, 2, B, Hkv, cap, d).

    ``length`` tokens are valid (the same count in every layer).
    """

    def __init__(self, n_layers: int, B: int, n_kv: int, d: int, capacity: int, dtype, device):
        self.buf = torch.empty(n_layers, 2, B, n_kv, capacity, d, dtype=dtype, device=device)
        self.length = 0
        self.capacity = capacity

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, at: int) -> None:
        """Store k, v (B, n, Hkv, d) at token slots [at, at + n)."""
        n = k.shape[1]
        if at + n > self.capacity:
            raise RuntimeError(f"KV cache overflow: {at + n} > capacity {self.capacity}")
        self.buf[layer, 0, :, :, at:at + n] = k.transpose(1, 2)
        self.buf[layer, 1, :, :, at:at + n] = v.transpose(1, 2)

    def view(self, layer: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The first n tokens as (B, n, Hkv, d) views (no copy)."""
        return self.buf[layer, 0, :, :, :n].transpose(1, 2), self.buf[layer, 1, :, :, :n].transpose(1, 2)

    @property
    def nbytes(self) -> int:
        return self.buf.numel() * self.buf.element_size()


class ModelRunner:
    """Runs prefill and greedy decode of ``model`` across the ranks of ``ctx`` (None: one process).

    Args:
        prefill: ``local`` | ``ring``;  decode: ``local`` | ``tree`` | ``ring``.
        layout: ring prefill layout (``zigzag`` | ``contiguous``).
        reduction, topology: tree decode merge (see :func:`hpcattn.methods.tree_decode`).
        placement: where generated tokens' KV goes: ``last`` rank or ``round_robin``.
    """

    def __init__(self, model: Transformer, ctx, kernel: Kernel, *, prefill: str = "ring", decode: str = "tree",
                 layout: str = "zigzag", reduction: str = "allgather", topology: str = "flat",
                 placement: str = "last", query_len: int = 1, star_block: int | None = None,
                 star_anchor: int | None = None, star_quirk: bool = False, apb=None,
                 compressor="query_aware", apb_seed: int = 0):
        if decode == "local" and prefill != "local" and ctx is not None and ctx.size > 1:
            raise ValueError("decode=local needs prefill=local (the cache must be whole on every rank)")
        self.model, self.ctx, self.kernel = model, ctx, kernel
        self.prefill_method, self.decode_method = prefill, decode
        self.layout, self.reduction, self.topology, self.placement = layout, reduction, topology, placement
        # star / apb prefill (hpcattn.model.approx_prefill): the last query_len prompt tokens are the query
        self.query_len, self.star_block, self.star_anchor, self.star_quirk = query_len, star_block, star_anchor, star_quirk
        self.apb, self.compressor, self.apb_seed = apb, compressor, apb_seed
        if prefill in ("star", "apb") and decode == "local" and ctx is not None and ctx.size > 1:
            raise ValueError("decode=local needs prefill=local (the cache must be whole on every rank)")
        self.p = ctx.size if ctx is not None else 1
        self.r = ctx.rank if ctx is not None else 0
        a = model.args
        self.scale = a.head_dim ** -0.5
        self.cache: ShardedKVCache | None = None
        self.lengths: list[int] = []      # valid cache tokens of every rank
        self.n_prompt = 0
        self.step = 0

    # -- prefill -------------------------------------------------------------------------------
    def _prefill_index(self, n: int) -> tuple[torch.Tensor, slice]:
        """(token indices this rank runs through the model, which of them it keeps in its cache)."""
        if self.prefill_method == "local":
            if self.decode_method == "local" or self.p == 1:
                return torch.arange(n), slice(0, n)
            a, b = contiguous_bounds(n, self.p, self.r)
            return torch.arange(n), slice(a, b)
        layout = self.layout if self.p > 1 else "contiguous"
        idx = layout_indices(layout, n, self.p, self.r)
        return idx, slice(0, len(idx))

    def prefill(self, tokens: torch.Tensor, new_tokens: int) -> torch.Tensor:
        """tokens (B, N) identical on every rank -> float32 logits (B, vocab) of the last prompt
        token, identical on every rank. Allocates the cache for ``new_tokens`` more tokens."""
        if self.prefill_method in ("star", "apb"):
            from hpcattn.model.approx_prefill import approx_prefill
            if self.p == 1:
                raise ValueError("star/apb prefill needs at least 2 ranks")
            return approx_prefill(self, tokens, new_tokens)
        B, N = tokens.shape
        a = self.model.args
        dev = tokens.device
        idx, keep = self._prefill_index(N)
        kept = keep.stop - keep.start
        local_decode = self.decode_method == "local"
        self.cache = ShardedKVCache(a.n_layers, B, a.n_kv_heads, a.head_dim, kept + new_tokens,
                                    self.model.tok_embeddings.weight.dtype, dev)
        self.lengths = [self._kept_on(i, N) for i in range(self.p)] if not local_decode else [N] * self.p
        self.n_prompt, self.step = N, 0
        causal_layout = self.layout if self.p > 1 else "contiguous"

        def attend(layer, q, k, v, **_):
            self.cache.write(layer, k[:, keep], v[:, keep], 0)
            if self.prefill_method == "ring" and self.p > 1:
                out, _ = ring_prefill(q, k, v, self.ctx, kernel=self.kernel, scale=self.scale, causal=True,
                                      layout=causal_layout)
                return out
            out, _ = self.kernel(q, k, v, scale=self.scale, causal="square")
            return out

        hidden = self.model(tokens[:, idx.to(dev)], idx.to(dev), attend)
        self.cache.length = kept
        last = (idx == N - 1).nonzero().flatten()
        logits = torch.empty(B, a.vocab_size, dtype=torch.float32, device=dev)
        if len(last):
            logits.copy_(self.model.logits(hidden[:, last])[:, 0])
        if self.p > 1 and self.prefill_method == "ring":
            # the last prompt token is in chunk 2p-1 (rank 0) under zigzag, on rank p-1 if contiguous
            self.ctx.world.broadcast(logits, root=0 if causal_layout == "zigzag" else self.p - 1)
        return logits

    def _kept_on(self, rank: int, n: int) -> int:
        if self.prefill_method == "local":
            a, b = contiguous_bounds(n, self.p, rank)
            return b - a
        return len(layout_indices(self.layout if self.p > 1 else "contiguous", n, self.p, rank))

    # -- decode --------------------------------------------------------------------------------
    def _owner(self) -> int:
        return self.p - 1 if self.placement == "last" else self.step % self.p

    def decode_step(self, token: torch.Tensor) -> torch.Tensor:
        """token (B,) identical on every rank -> float32 logits (B, vocab), identical on every rank."""
        B = token.shape[0]
        dev = token.device
        pos = torch.tensor([self.n_prompt + self.step], device=dev)
        local = self.decode_method == "local" or self.p == 1
        owner = self._owner()
        mine = local or self.r == owner
        n_mine = self.cache.length + (1 if mine else 0)
        lengths = list(self.lengths)
        if not local:
            lengths[owner] += 1

        def attend(layer, q, k, v, **_):
            if mine:
                self.cache.write(layer, k, v, self.cache.length)
            kc, vc = self.cache.view(layer, n_mine)
            if local:
                out, _ = self.kernel(q, kc, vc, scale=self.scale)
            elif self.decode_method == "tree":
                out, _ = tree_decode(q, kc, vc, self.ctx, kernel=self.kernel, scale=self.scale,
                                     reduction=self.reduction, topology=self.topology)
            elif self.decode_method == "ring":
                out, _ = ring_decode(q, kc, vc, self.ctx, kernel=self.kernel, scale=self.scale,
                                     shard_lengths=[[n] * B for n in lengths])
            else:
                raise ValueError(f"unknown decode method {self.decode_method!r}")
            return out

        hidden = self.model(token[:, None], pos, attend)
        self.cache.length = n_mine
        self.lengths = lengths if not local else [n_mine] * self.p
        self.step += 1
        return self.model.logits(hidden)[:, -1]

    def next_token(self, logits: torch.Tensor) -> torch.Tensor:
        """Greedy choice (B,), made identical on every rank by a broadcast from rank 0."""
        tok = logits.argmax(dim=-1)
        if self.p > 1:
            self.ctx.world.broadcast(tok, root=0)
        return tok

    @torch.inference_mode()
    def generate(self, tokens: torch.Tensor, new_tokens: int, timer=None):
        """Greedy generation. Returns (generated (B, new_tokens) int64, logits (new_tokens, B, V)
        float32: the logits each generated token was chosen from).

        ``timer(phase)`` (optional) is a context manager wrapping ``prefill`` and each ``decode``."""
        import contextlib

        timer = timer or (lambda name: contextlib.nullcontext())
        with timer("prefill"):
            logits = self.prefill(tokens, new_tokens)
            tok = self.next_token(logits)
        out, all_logits = [tok], [logits]
        for _ in range(new_tokens - 1):
            with timer("decode"):
                logits = self.decode_step(tok)
                tok = self.next_token(logits)
            out.append(tok)
            all_logits.append(logits)
        return torch.stack(out, dim=1), torch.stack(all_logits)
