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

Prompt logits (``prompt_logits=True``, for validation: B x N x vocab float32 on rank 0): the prefill
keeps the final hidden states of the prompt positions this rank computed (ring: its zigzag or
contiguous shard; local: rank 0 all of them; star/apb: its blocks without the anchor, and the
query host the query), and :meth:`ModelRunner.gather_prompt_logits` (collective, after the timed
work) turns them into logits and gathers them to rank 0 in token order.

CUDA graphs (``cuda_graphs``: ``auto`` | ``true`` | ``false``, see :mod:`hpcattn.graph`): the
decode step of ``local`` and ``tree`` (NCCL, ``kv_placement: last``) is captured once per batch
shape over static buffers - the KV cache at its capacity, the token, its position, the cache slot
and the attention lengths as device tensors that the graph itself advances - and replayed every
step. The captured forward is :func:`hpcattn.model.fused_decode.decode_forward` (the same model
with its small ops fused: 14 kernels per layer instead of ~47). Attention inside the graph is the
Lean kernel with device lengths (the only kernel here that reads lengths from the device, so one
graph serves every step as the cache grows). Graphs and
their buffers are kept in ``graph_cache`` (one dict per job), so the repeats of a case replay the
graph captured in the first generation. Host-staged MPI, ring decode, round-robin placement and
CPU runs stay eager, and :meth:`ModelRunner.graph_attrs` says which mode ran and why.
"""

from __future__ import annotations

import contextlib

import torch

from hpcattn import graph
from hpcattn.kernels import Kernel
from hpcattn.methods import ring_decode, ring_prefill, tree_decode
from hpcattn.methods.sharding import contiguous_bounds, gather_in_order, layout_indices
from hpcattn.model.approx_prefill import approx_prefill
from hpcattn.model.kv_cache import ShardedKVCache
from hpcattn.model.llama import Transformer
from hpcattn.model.options import RunnerOptions
from hpcattn.timing import NullTimer


class ModelRunner:
    """Runs prefill and greedy decode of ``model`` across the ranks of ``ctx`` (None: one process).

    Args:
        options: how to prefill and decode (:class:`hpcattn.model.options.RunnerOptions`); the flat
            keywords ``kw`` (its fields and :class:`~hpcattn.model.options.ApproxOptions`'s, e.g.
            ``prefill="ring", decode="tree", query_len=4``) replace fields of ``options``.
        graph_cache: where captured decode steps and their caches are kept (one dict per job, so
            the repeats of a case replay the graph captured in the first generation).
    """

    def __init__(self, model: Transformer, ctx, kernel: Kernel, options: RunnerOptions | None = None, *,
                 graph_cache: dict | None = None, **kw):
        self.options = opt = RunnerOptions.of(options, **kw)
        if opt.decode == "local" and opt.prefill != "local" and ctx is not None and ctx.size > 1:
            raise ValueError("decode=local needs prefill=local (the cache must be whole on every rank)")
        self.model, self.ctx, self.kernel = model, ctx, kernel
        self.p = ctx.size if ctx is not None else 1
        self.r = ctx.rank if ctx is not None else 0
        a = model.args
        self.scale = a.head_dim ** -0.5
        self.cache: ShardedKVCache | None = None
        self.lengths: list[int] = []      # valid cache tokens of every rank
        self.n_prompt = 0
        self.step = 0
        self.prompt_hidden: list[tuple[torch.Tensor, torch.Tensor]] = []   # (index (n,), hidden (B, n, dim))
        self.graph_cache = graph_cache if graph_cache is not None else {}
        self._graph_on, self._graph_why = self._graph_decision()
        self._static = None               # the captured decode step of this runner (graph mode)
        # ``with phase_timer(label):`` around the approximate prefills' scoring and exchange (the
        # model-level projection's per-block breakdown sets a SegmentClock here)
        self.phase_timer = NullTimer()

    # -- the state a prefill leaves (also set by hpcattn.model.approx_prefill) --------------------
    def new_cache(self, B: int, capacity: int) -> ShardedKVCache:
        """An empty KV cache of ``capacity`` tokens per layer for B sequences becomes this runner's
        cache (in graph mode the one a captured step of this shape already reads)."""
        a = self.model.args
        w = self.model.tok_embeddings.weight
        self.cache = self._new_cache(a.n_layers, B, a.n_kv_heads, a.head_dim, capacity, w.dtype, w.device)
        return self.cache

    def set_prompt(self, n_prompt: int, lengths: list[int]) -> None:
        """The prompt's ``n_prompt`` tokens are cached, ``lengths[i]`` of them on rank i; decoding
        starts at step 0."""
        self.n_prompt, self.step, self.lengths = n_prompt, 0, lengths

    def keep_hidden(self, index: torch.Tensor, hidden: torch.Tensor) -> None:
        """With ``prompt_logits``: keep the final hidden states (B, n, dim) of the prompt positions
        ``index`` (n,) this rank computed, for :meth:`gather_prompt_logits`."""
        if self.options.prompt_logits:
            self.prompt_hidden.append((index, hidden))

    # -- prefill -------------------------------------------------------------------------------
    def _prefill_index(self, n: int) -> tuple[torch.Tensor, slice]:
        """(token indices this rank runs through the model, which of them it keeps in its cache)."""
        if self.options.prefill == "local":
            if self.options.decode == "local" or self.p == 1:
                return torch.arange(n), slice(0, n)
            a, b = contiguous_bounds(n, self.p, self.r)
            return torch.arange(n), slice(a, b)
        layout = self.options.layout if self.p > 1 else "contiguous"
        idx = layout_indices(layout, n, self.p, self.r)
        return idx, slice(0, len(idx))

    def prefill(self, tokens: torch.Tensor, new_tokens: int, on_layer_kv=None) -> torch.Tensor:
        """tokens (B, N) identical on every rank -> float32 logits (B, vocab) of the last prompt
        token, identical on every rank. Allocates the cache for ``new_tokens`` more tokens.
        ``on_layer_kv(layer, kv)`` (local/ring; optional) gets each layer's kept KV, (2, B, Hkv,
        kept, d), as soon as it is in the cache (Lamina streams it to its attention ranks).
        With ``prompt_logits`` it also keeps this rank's final hidden states of the prompt."""
        self.prompt_hidden = []
        if self.options.prefill in ("star", "apb"):
            if self.p == 1:
                raise ValueError("star/apb prefill needs at least 2 ranks")
            return approx_prefill(self, tokens, new_tokens)
        B, N = tokens.shape
        a = self.model.args
        dev = tokens.device
        idx, keep = self._prefill_index(N)
        kept = keep.stop - keep.start
        local_decode = self.options.decode == "local"
        self.new_cache(B, kept + new_tokens)
        self.set_prompt(N, [self._kept_on(i, N) for i in range(self.p)] if not local_decode else [N] * self.p)
        causal_layout = self.options.layout if self.p > 1 else "contiguous"

        def attend(layer, q, k, v, **_):
            self.cache.write(layer, k[:, keep], v[:, keep], 0)
            if on_layer_kv is not None:
                on_layer_kv(layer, self.cache.buf[layer, :, :, :, :kept])
            if self.options.prefill == "ring" and self.p > 1:
                out, _ = ring_prefill(q, k, v, self.ctx, kernel=self.kernel, scale=self.scale, causal=True,
                                      layout=causal_layout)
                return out
            out, _ = self.kernel(q, k, v, scale=self.scale, causal="square")
            return out

        hidden = self.model(tokens[:, idx.to(dev)], idx.to(dev), attend)
        self.cache.length = kept
        if self.options.prefill == "ring" or self.r == 0:
            self.keep_hidden(idx, hidden)                 # local prefill: every rank has all; rank 0 keeps them
        last = (idx == N - 1).nonzero().flatten()
        logits = torch.empty(B, a.vocab_size, dtype=torch.float32, device=dev)
        if len(last):
            logits.copy_(self.model.logits(hidden[:, last])[:, 0])
        if self.p > 1 and self.options.prefill == "ring":
            # the last prompt token is in chunk 2p-1 (rank 0) under zigzag, on rank p-1 if contiguous
            self.ctx.world.broadcast(logits, root=0 if causal_layout == "zigzag" else self.p - 1)
        return logits

    @torch.inference_mode()
    def gather_prompt_logits(self) -> torch.Tensor | None:
        """Collective, after :meth:`prefill` of a runner made with ``prompt_logits=True``: float32
        logits (B, N, vocab) of every prompt position, in token order, on rank 0 (CPU; computed on
        the ranks that hold the positions); None on the other ranks."""
        if not self.options.prompt_logits:
            raise RuntimeError("gather_prompt_logits needs a ModelRunner made with prompt_logits=True")
        mine = self.prompt_hidden
        index = torch.cat([i for i, _ in mine]) if mine else None
        logits = torch.cat([self.model.logits(h) for _, h in mine], dim=1) if mine else None
        self.prompt_hidden = []
        return gather_in_order(self.ctx.world if self.p > 1 else None, index, logits, 1, self.n_prompt)

    def prime(self, B: int, n_cached: int, new_tokens: int) -> None:
        """Decode set-up without a prefill (benchmarks: a step's cost does not depend on the cache's
        values): a cache of ``n_cached + new_tokens`` slots per rank holding ``n_cached`` tokens,
        its content left to the caller. Single process only."""
        self.new_cache(B, n_cached + new_tokens).length = n_cached
        self.set_prompt(n_cached, [n_cached] * self.p)

    def _kept_on(self, rank: int, n: int) -> int:
        if self.options.prefill == "local":
            a, b = contiguous_bounds(n, self.p, rank)
            return b - a
        return len(layout_indices(self.options.layout if self.p > 1 else "contiguous", n, self.p, rank))

    # -- decode --------------------------------------------------------------------------------
    def _owner(self) -> int:
        return self.p - 1 if self.options.placement == "last" else self.step % self.p

    def decode_step(self, token: torch.Tensor) -> torch.Tensor:
        """token (B,) identical on every rank -> float32 logits (B, vocab), identical on every rank."""
        if self._graph_on:
            return self._graph_step(token)
        B = token.shape[0]
        dev = token.device
        pos = torch.tensor([self.n_prompt + self.step], device=dev)
        local = self.options.decode == "local" or self.p == 1
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
            elif self.options.decode == "tree":
                out, _ = tree_decode(q, kc, vc, self.ctx, kernel=self.kernel, scale=self.scale,
                                     reduction=self.options.reduction, topology=self.options.topology)
            elif self.options.decode == "ring":
                out, _ = ring_decode(q, kc, vc, self.ctx, kernel=self.kernel, scale=self.scale,
                                     shard_lengths=[[n] * B for n in lengths])
            else:
                raise ValueError(f"unknown decode method {self.options.decode!r}")
            return out

        hidden = self.model(token[:, None], pos, attend)
        self.cache.length = n_mine
        self.lengths = lengths if not local else [n_mine] * self.p
        self.step += 1
        return self.model.logits(hidden)[:, -1]

    # -- CUDA-graph decode ------------------------------------------------------------------------
    def _graph_decision(self) -> tuple[bool, str]:
        dev = self.model.tok_embeddings.weight.device
        ctx = self.ctx
        reason = graph.blocker(device=dev.type, method="local" if self.p == 1 else self.options.decode,
                               backend=ctx.backend if ctx is not None else "mpi", world_size=self.p,
                               placement=self.options.placement)
        if reason is None and self.options.prefill in ("star", "apb"):
            reason = f"{self.options.prefill} prefill builds its own decode cache (eager)"
        if reason is None:
            self._lean, reason = graph.lean_for_graphs(dev, self.model.tok_embeddings.weight.dtype,
                                                       self.model.args.head_dim)
        return graph.decide(self.options.cuda_graphs, reason)

    def graph_attrs(self) -> dict:
        """Record attributes: which decode mode ran and why (and the graph's attention kernel)."""
        attrs = {"cuda_graphs": "graph" if self._graph_on else "eager", "cuda_graphs_reason": self._graph_why}
        if self._graph_on:
            attrs["decode_kernel"] = "lean"
            attrs["decode_products"] = self.options.decode_products
        return attrs

    def _new_cache(self, *shape_dtype_device) -> ShardedKVCache:
        """A fresh cache, or in graph mode the one a captured step of this shape already reads."""
        if not self._graph_on:
            return ShardedKVCache(*shape_dtype_device)
        key = ("cache",) + tuple(str(x) for x in shape_dtype_device)
        cache = self.graph_cache.get(key)
        if cache is None:
            cache = self.graph_cache[key] = ShardedKVCache(*shape_dtype_device)
        cache.length = 0
        return cache

    def _graph_step(self, token: torch.Tensor) -> torch.Tensor:
        """The decode step as one graph replay; same contract as :meth:`decode_step`."""
        local = self.options.decode == "local" or self.p == 1
        owner = self._owner()
        mine = local or self.r == owner
        if mine and self.cache.length + 1 > self.cache.capacity:
            raise RuntimeError(f"KV cache overflow: {self.cache.length + 1} > capacity {self.cache.capacity}")
        st = self._static
        if st is None:
            st = self._static = self._static_step(token.shape[0], local, mine)
            st["pos"].fill_(self.n_prompt + self.step)
            st["at"].fill_(self.cache.length)
            st["klen"].fill_(self.cache.length + (1 if mine else 0))
        st["token"].copy_(token)
        logits = st["graph"]()
        self.cache.length += 1 if mine else 0
        if not local:
            self.lengths[owner] += 1
        else:
            self.lengths = [self.cache.length] * self.p
        self.step += 1
        return logits.clone()             # the graph's output buffer is overwritten next step

    def _static_step(self, B: int, local: bool, mine: bool) -> dict:
        """Capture (or fetch from ``graph_cache``) the decode step over this runner's cache."""
        from hpcattn.model.fused_decode import decode_forward

        o = self.options
        key = ("step", B, id(self.cache), local, mine, o.decode, o.reduction, o.topology, o.decode_products)
        st = self.graph_cache.get(key)
        if st is not None:
            return st
        dev = self.cache.buf.device
        cache, model, kern = self.cache, self.model, self._lean
        st = {"token": torch.zeros(B, dtype=torch.long, device=dev),
              "pos": torch.full((1,), self.n_prompt + self.step, dtype=torch.long, device=dev),
              "at": torch.full((1,), cache.length, dtype=torch.long, device=dev),
              "klen": torch.full((B,), cache.length + (1 if mine else 0), dtype=torch.int32, device=dev)}

        def attend(layer, q):
            kc, vc = cache.view(layer, cache.capacity)    # at capacity; klen says what is valid
            if local:
                out, _ = kern(q, kc, vc, scale=self.scale, k_lengths=st["klen"])
            else:
                out, _ = tree_decode(q, kc, vc, self.ctx, kernel=kern, scale=self.scale,
                                     k_lengths=st["klen"], reduction=o.reduction, topology=o.topology)
            return out

        def slot(layer):                                  # this token's k, v go to slot `at`
            return (cache.buf[layer, 0], cache.buf[layer, 1]) if mine else None

        def step():
            logits = decode_forward(model, st["token"], st["pos"], slot=slot, at=st["at"], attend=attend,
                                    products=o.decode_products)
            st["pos"].add_(1)
            if mine:
                st["at"].add_(1)
                st["klen"].add_(1)
            return logits

        saved = {k: st[k].clone() for k in ("pos", "at", "klen")}
        st["graph"] = graph.StepGraph(step, warmup=1, counters=self.ctx.counters if self.ctx is not None else None)
        for k, v in saved.items():                       # undo the warm-up's advance
            st[k].copy_(v)
        self.graph_cache[key] = st
        return st

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
