"""Lamina (arXiv 2405.01814, spec lamina.md): model-attention disaggregated greedy decoding.

Roles on one MPI world of W ranks, A = ``lamina.attention_ranks``:

* world ranks [0, M), M = W - A, are **model ranks**: they hold the weights and run embeddings,
  norms, the q/k/v and output projections, the FFN, the final norm + head and sampling;
* world ranks [M, W) are **attention ranks**: attention rank a holds the KV heads
  [a*Hkv/A, (a+1)*Hkv/A) of *every* sequence (head split; Hkv % A == 0) and runs only attention.
  They hold no weights.

**Slices.** A decode step of L layers is L model *slices* per micro-batch; slice k of step t
(global slice s = t*L + k) runs "post-attention of layer k-1 (o-proj, residual, FFN), pre-attention
of layer k (norm, q/k/v projections, RoPE)". Slice k = 0 instead takes the last layer's output of
step t-1 through the head, samples token t (step 0: from the prefill logits), embeds it and runs
layer 0's pre-attention. A last slice s = (n-1)*L only samples token n-1.

**Exchange per layer and micro-batch** (spec section 4, 5.3): the model rank computes q first and
sends attention rank a its query heads, then k, v and sends a its KV heads; attention rank a
attends q to its cached prefix (ragged lengths allowed) while k, v are in flight, receives them,
folds the new token's state (out = v_new, lse = scale * q.k_new) in with the LSE merge
(:func:`hpcattn.kernels.merge_pair`), appends k, v to its cache and sends the output heads to the
model rank of the next slice. Bytes per token per layer: (2 + 2/G) * Hq*d * e.

**Rotational staggered pipeline** (spec 5.4): the batch is cut into m contiguous micro-batches;
slice s of micro-batch j runs on model rank (j + s) mod M, so with several model ranks the
micro-batches rotate over them and the residual stream x (B_j, 1, dim) migrates with each slice;
with one model rank it alternates between micro-batches (no migration). Every send and receive is
non-blocking (``Comm.isend``/``Comm.irecv``), the receives of a rank's next item are posted
before it computes the current one, so a model rank computes micro-batch j+1 while the attention
ranks work on micro-batch j. Every rank walks its items in the global order (s, j), which is a
topological order of the dependencies, so the schedule cannot deadlock.

**When receives are posted**: a rank posts the receives of
its next item *before* computing the current one when the next item is another micro-batch
(independent of the current item), so its transfer overlaps this compute; when it is the same
micro-batch (one micro-batch, or its next slice on this rank), its inputs depend on the current
item's sends, and the receives are posted *after* them: NCCL runs a rank pair's operations in
issue order, so a receive queued before the send it depends on would deadlock.

**Prefill hand-over**: the model ranks run an existing prefill method (``local`` or ``ring``,
:class:`hpcattn.model.runner.ModelRunner` over the model ranks' sub-communicator), once per distinct
prompt length (ragged prompts); as soon as a layer's KV is in the runner's cache they post one
non-blocking send per attention rank of its heads of their prompt-KV shard, so the transfer of
layer l overlaps the prefill of layers > l; attention ranks wait for layer l's pieces only when
their first attention of layer l needs them (decode step 0).

**CUDA graphs** (``cuda_graphs``: ``run.cuda_graphs``, :mod:`hpcattn.graph`): on a CUDA rank
(``auto``), each role's work between two exchanges is captured once and replayed every step, over
static buffers; the exchanges (isend / irecv of the static buffers) stay outside the graphs, so this
works over every transport (host-staged MPI, CUDA-aware MPI, NCCL). A model rank captures, per
micro-batch, one piece per layer k - layer k-1's post-attention (o product + residual, norm, FFN)
and layer k's pre-attention (norm, fused q/k/v product, RoPE per row), for k = 0 the last layer's
post-attention, the head, the greedy token, the next position and its embedding in front - and the
last slice of a generation (:class:`hpcattn.model.lamina.steps.ModelSlices`, the ops of the captured
colocated step, :mod:`hpcattn.model.fused_decode`); an attention rank captures, per micro-batch,
one piece per layer: Lean over the prefix with device lengths, the new token's fold and its append
at device slots (:class:`hpcattn.model.lamina.steps.AttentionRole`). The pieces are captured before
the prefill of the first generation of a (prompt lengths, tokens) shape, so that no message is in
flight, and reused by the following generations. A static send buffer is rewritten only after its
previous send completed. The GPU time of each replayed piece (CUDA events around it) is recorded
per step (``RankResult.piece_s``), so that a role's busy time splits into its pieces' device time
and the host's share (launches, syncs, the transport's work in the sends). CPU ranks and ``false``
run eagerly: every op of a slice or an attention
item is its own host launch (the plain model, the configured kernel). Each rank's mode and why:
:meth:`LaminaDecoder.graph_attrs` (the record's per-role ``lamina_*_cuda_graphs``).

Shapes (hpcattn convention): tokens (B, N) int64; q (B_j, 1, Hq, d), k, v (B_j, 1, Hkv, d);
logits (B_j, vocab) float32.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from hpcattn import graph
from hpcattn.kernels import Kernel
from hpcattn.methods.sharding import contiguous_bounds, layout_indices
from hpcattn.model.kv_cache import ShardedKVCache
from hpcattn.model.lamina.ops import append_new_token, finish_layer, fold_new_token, project_kv, project_q
from hpcattn.model.lamina.steps import AttentionRole, ModelSlices
from hpcattn.model.llama import ModelArgs
from hpcattn.model.runner import ModelRunner

MODEL, ATTENTION = "model", "attention"
TAG_Q, TAG_KV, TAG_OUT, TAG_X, TAG_PROMPT_KV = 1, 2, 3, 4, 5
BYTE_PHASES = ("handover", "q", "kv", "out", "migrate")     # byte-counter phases of a Lamina run
DECODE_PHASES = ("q", "kv", "out", "migrate")
# each role's work between two exchanges is captured; the exchanges stay outside (any transport)
CUDA_GRAPHS = graph.declare("lamina", graph.Capture(comm_inside=False))


@dataclass(frozen=True)
class Layout:
    """Ranks, heads and micro-batches of one Lamina run.

    Args:
        world: W ranks; attention_ranks: A (the last A world ranks).
        n_heads, n_kv_heads: Hq, Hkv of the model; batch: B; microbatches: m (<= B).
    """

    world: int
    attention_ranks: int
    n_heads: int
    n_kv_heads: int
    batch: int
    microbatches: int

    @property
    def model_ranks(self) -> int:
        return self.world - self.attention_ranks

    def role(self, rank: int) -> str:
        return MODEL if rank < self.model_ranks else ATTENTION

    def kv_heads(self, a: int) -> tuple[int, int]:
        """[lo, hi) of the KV heads attention rank a (0-based among attention ranks) owns."""
        h = self.n_kv_heads // self.attention_ranks
        return a * h, (a + 1) * h

    def q_heads(self, a: int) -> tuple[int, int]:
        g = self.n_heads // self.n_kv_heads
        lo, hi = self.kv_heads(a)
        return lo * g, hi * g

    def rows(self, j: int) -> tuple[int, int]:
        """[b0, b1) of micro-batch j's sequences."""
        return contiguous_bounds(self.batch, self.microbatches, j)

    def model_rank(self, j: int, s: int) -> int:
        """World rank running slice s of micro-batch j (the rotation of spec section 5.4)."""
        return (j + s) % self.model_ranks


def kept_indices(prefill: str, ring_layout: str, n: int, p: int, r: int) -> torch.Tensor:
    """Prompt token indices whose KV model rank r of p keeps after ModelRunner's prefill with a
    distributed decode (local: contiguous shard; ring: its layout shard)."""
    if p == 1:
        return torch.arange(n)
    if prefill == "local":
        a, b = contiguous_bounds(n, p, r)
        return torch.arange(a, b)
    return layout_indices(ring_layout, n, p, r)


@dataclass
class RankResult:
    """What one rank measured in one generation.

    tokens (B, n) int64 and logits (n, B, vocab) float32 are set on world rank 0 only (logits when
    asked for). step_s, busy_s, wait_s: (n-1,) seconds per decode step of this rank: wall time
    since the rank's previous step ended, time computing, time waiting for data. piece_s: (n-1,)
    device seconds of the captured pieces this rank replayed in each step (graph mode on a GPU;
    NaN otherwise): busy_s - piece_s is the host's share of the busy time (launches, syncs, sends).
    send_s: (n-1,) seconds of the busy time spent in send calls (the transport's work there: staging
    copies, MPI's handling of device buffers; on a GPU over MPI after the device finished the data).
    """

    role: str
    prefill_s: float
    step_s: list[float]
    busy_s: list[float]
    wait_s: list[float]
    bytes: dict[str, int]
    piece_s: list[float] = field(default_factory=list)
    send_s: list[float] = field(default_factory=list)
    tokens: torch.Tensor | None = None
    logits: torch.Tensor | None = None


@dataclass
class _Clock:
    """Per-step busy / wait / end-time accounting of one rank (perf_counter, device-synced)."""

    ctx: object
    steps: int
    timed: bool = False          # graph mode on a GPU: time each replayed piece with CUDA events
    busy: list[float] = field(default_factory=list)
    wait: list[float] = field(default_factory=list)
    end: list[float] = field(default_factory=list)
    piece: list[float] = field(default_factory=list)
    send: list[float] = field(default_factory=list)

    def __post_init__(self):
        self.busy, self.wait, self.end, self.send = ([0.0] * self.steps for _ in range(4))
        self._sending = 0.0               # time in send calls since the last computed()
        self.piece = [0.0 if self.timed else float("nan")] * self.steps
        self._events = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) if self.timed \
            else None
        self._replayed = False

    def replay(self, piece):
        """``piece()`` between two CUDA events when timed (read by :meth:`computed`, after its sync)."""
        if self._events is None:
            return piece()
        self._events[0].record()
        out = piece()
        self._events[1].record()
        self._replayed = True
        return out

    def sent(self, seconds: float) -> None:
        """A send call took ``seconds`` of the current item's busy time (booked by :meth:`computed`)."""
        self._sending += seconds

    def waited(self, step: int, reqs) -> None:
        """Wait for receives; on GPUs also for the device (an nccl wait only orders the stream)."""
        t0 = time.perf_counter()
        for r in reqs:
            r.wait()
        self.ctx.sync()
        if self.steps:
            self.wait[step] += time.perf_counter() - t0

    def computed(self, step: int, t0: float) -> None:
        self.ctx.sync()
        if self.steps:
            self.busy[step] += time.perf_counter() - t0
            self.send[step] += self._sending
        self._sending = 0.0
        if self._replayed:
            self._replayed = False
            if self.steps:
                self.piece[step] += self._events[0].elapsed_time(self._events[1]) / 1e3

    def finished(self, step: int) -> None:
        if self.steps:
            self.end[step] = time.perf_counter()

    def step_times(self, start: float) -> list[float]:
        out, prev = [], start
        for e in self.end:
            e = max(e, prev)                      # a step with no item on this rank takes 0 s
            out.append(e - prev)
            prev = e
        return out


class LaminaDecoder:
    """One rank's part of a Lamina generation (collective over ``ctx.world``).

    Args:
        layout: the run's :class:`Layout`.
        ctx: the world CommContext; ``role_ctx``: this rank's role group (:func:`hpcattn.comm.split`).
        args: model shapes (every rank); model: the Transformer (model ranks; None on attention ranks).
        kernel: local attention kernel (attention ranks: decode; model ranks: prefill).
        dtype: model/KV dtype; prefill: ``local`` | ``ring``; ring_layout: ``zigzag`` | ``contiguous``.
    """

    def __init__(self, layout: Layout, ctx, role_ctx, args: ModelArgs, kernel: Kernel, dtype: torch.dtype,
                 model=None, prefill: str = "ring", ring_layout: str = "zigzag", cuda_graphs: str = "false",
                 decode_products: str = "auto"):
        self.layout, self.ctx, self.role_ctx = layout, ctx, role_ctx
        self.args, self.kernel, self.dtype, self.model = args, kernel, dtype, model
        self.prefill_method, self.ring_layout = prefill, ring_layout
        self.rank = ctx.rank
        self.role = layout.role(self.rank)
        self.scale = args.head_dim ** -0.5
        if self.role == MODEL and model is None:
            raise ValueError("a model rank needs the model")
        self.cuda_graphs, self.decode_products = cuda_graphs, decode_products
        self.graph_on, self.graph_why = self._graph_decision()
        self._graphs: dict = {}           # graph mode: the captured pieces, buffers and cache of one (lengths, n)
        self._inflight: dict = {}         # graph mode: (micro-batch, layer) -> sends still reading its buffers

    # -- CUDA graphs ---------------------------------------------------------------------------
    def _graph_decision(self) -> tuple[bool, str]:
        """(capture this rank's pieces?, why) from ``cuda_graphs`` (:func:`hpcattn.graph.decide`):
        a CUDA rank captures (the exchange stays outside the graphs, so any transport works); the
        attention role also needs the Lean kernel (device lengths)."""
        reason = graph.blocker(device=self.ctx.device.type, method="lamina", backend=self.ctx.backend,
                               world_size=self.ctx.size)
        if reason is None and self.role != MODEL:
            self._lean, reason = graph.lean_for_graphs(self.ctx.device, self.dtype, self.args.head_dim)
        on, why = graph.decide(self.cuda_graphs, reason)
        if on:
            why = ("each role's work between two exchanges captured once per shape (per layer and micro-batch) "
                   "and replayed every step; the exchanges run outside the graphs")
        return on, why

    def graph_attrs(self) -> dict:
        """This rank's mode: {"cuda_graphs": "graph" | "eager", "cuda_graphs_reason": why}."""
        return {"cuda_graphs": "graph" if self.graph_on else "eager", "cuda_graphs_reason": self.graph_why}

    def _captured(self, lengths: list[int], n: int, build) -> dict:
        """The captured pieces of this (lengths, n), built by ``build()`` -> dict on first use (the
        capture's warm-up calls run for real: ``build`` restores what they change)."""
        key = (tuple(lengths), n)
        if self._graphs.get("key") != key:
            self._graphs = {"key": key, **build()}
        return self._graphs

    def _isend(self, t: torch.Tensor, dest: int, tag: int):
        """A decode step's ``Comm.isend``, its time booked to the generation's clock (``send_s``).
        Over MPI on a GPU the device is synchronised first (the send would wait for it anyway), so
        that the time is the transport's, not the kernels' that produce ``t``."""
        if self.ctx.device.type == "cuda" and self.ctx.world.transport.startswith("mpi"):
            torch.cuda.current_stream(self.ctx.device).synchronize()
        t0 = time.perf_counter()
        req = self.ctx.world.isend(t, dest, tag)
        self._clock.sent(time.perf_counter() - t0)
        return req

    def _replay(self, j: int, k, piece, captured: bool = True):
        """Replay ``piece`` after the sends of its buffers' previous contents are done (a captured
        piece timed by the generation's clock; ``captured=False``: an eager slice, not timed)."""
        for r in self._inflight.pop((j, k), ()):
            r.wait()
        return self._clock.replay(piece) if captured else piece()

    # -- schedule ------------------------------------------------------------------------------
    def _slices(self, n: int) -> int:
        """Model slices per micro-batch: (n-1) decode steps of L slices, plus the last sampling."""
        return (n - 1) * self.args.n_layers + 1

    def _step_of(self, s: int, n: int) -> int:
        return min(s // self.args.n_layers, n - 2)

    @torch.inference_mode()
    def generate(self, tokens: torch.Tensor | None, lengths: list[int], new_tokens: int,
                 keep_logits: bool = True) -> RankResult:
        """Greedy generation of ``new_tokens`` tokens for prompts tokens[b, :lengths[b]].

        ``tokens`` (B, N) on model ranks (None on attention ranks); ``lengths`` (B,) prompt lengths.
        """
        ctx = self.ctx
        ctx.counters.reset()
        t0 = time.perf_counter()
        self._inflight = {}
        if self.graph_on and self.role == MODEL:          # captured before any message is in flight
            self._model_pieces(lengths, new_tokens)
        if self.role == MODEL:
            state = self._model_prefill(tokens, lengths, new_tokens)
        else:
            state = self._attention_prefill(lengths, new_tokens)
        ctx.sync()
        t1 = time.perf_counter()
        clock = self._clock = _Clock(ctx, new_tokens - 1, timed=self.graph_on and ctx.device.type == "cuda")
        if self.role == MODEL:
            result = self._model_decode(state, lengths, new_tokens, clock, keep_logits)
        else:
            self._attention_decode(state, lengths, new_tokens, clock)
            result = None
        bytes_ = {ph: int(ctx.counters.bytes.get(ph, 0)) for ph in BYTE_PHASES}
        gathered = ctx.world.mpi.gather(result, root=0)
        toks = logits = None
        if self.rank == 0:
            toks, logits = self._assemble([g for g in gathered if g is not None], new_tokens, keep_logits)
        return RankResult(self.role, t1 - t0, clock.step_times(t1), clock.busy, clock.wait, bytes_, clock.piece,
                          clock.send, toks, logits)

    def _assemble(self, parts: list[dict], n: int, keep_logits: bool):
        """{(micro-batch j, token t): (tokens (B_j,), logits (B_j, V))} of every model rank -> (B, n), (n, B, V)."""
        B = self.layout.batch
        toks = torch.full((B, n), -1, dtype=torch.int64)
        logits = torch.empty(n, B, self.args.vocab_size, dtype=torch.float32) if keep_logits else None
        for part in parts:
            for (j, t), (tk, lg) in part.items():
                b0, b1 = self.layout.rows(j)
                toks[b0:b1, t] = tk
                if keep_logits:
                    logits[t, b0:b1] = lg
        return toks, logits

    # -- model ranks ---------------------------------------------------------------------------
    def _model_prefill(self, tokens: torch.Tensor, lengths: list[int], n: int) -> dict:
        """Prefill per prompt-length group on the model ranks, posting each layer's KV hand-over
        sends as soon as the layer's KV is cached."""
        lay, a = self.layout, self.args
        M = lay.model_ranks
        dev = tokens.device
        logits = torch.empty(lay.batch, a.vocab_size, dtype=torch.float32, device=dev)
        sends = []
        for plen, rows in _length_groups(lengths):
            runner = ModelRunner(self.model, self.role_ctx if M > 1 else None, self.kernel,
                                 prefill=self.prefill_method, decode="tree", layout=self.ring_layout)

            want = len(kept_indices(self.prefill_method, self.ring_layout, plen, M, self.rank))

            def hand_over(layer: int, kv: torch.Tensor) -> None:     # kv (2, Bg, Hkv, kept, d)
                if kv.shape[3] != want:     # the attention ranks size their receives by kept_indices
                    raise RuntimeError(f"internal error: prefill kept {kv.shape[3]} tokens, kept_indices says {want}")
                with ctx_phase(self.ctx, "handover"):
                    for ai in range(lay.attention_ranks):
                        lo, hi = lay.kv_heads(ai)
                        sends.append(self.ctx.world.isend(kv[:, :, lo:hi].contiguous(), M + ai, TAG_PROMPT_KV))

            idx = torch.tensor(rows, device=dev)
            logits[idx] = runner.prefill(tokens[idx, :plen], 0, on_layer_kv=hand_over)
        return {"logits": logits, "sends": sends}

    def _pre(self, layer: int, x: torch.Tensor, cos, sin, step_sends: list) -> None:
        """Norm + q projection (sent first) + k, v projections (sent next) of ``layer`` for x (B_j, 1, dim)."""
        lay = self.layout
        h = self.model.layers[layer].attention_norm(x)
        q = project_q(self.model, layer, h, cos, sin)
        M = lay.model_ranks
        with ctx_phase(self.ctx, "q"):
            for ai in range(lay.attention_ranks):
                lo, hi = lay.q_heads(ai)
                step_sends.append(self._isend(q[:, :, lo:hi].contiguous(), M + ai, TAG_Q))
        k, v = project_kv(self.model, layer, h, cos, sin)
        with ctx_phase(self.ctx, "kv"):
            for ai in range(lay.attention_ranks):
                lo, hi = lay.kv_heads(ai)
                step_sends.append(self._isend(torch.stack((k[:, :, lo:hi], v[:, :, lo:hi])).contiguous(),
                                                       M + ai, TAG_KV))

    def _post(self, layer: int, x: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
        return finish_layer(self.model, layer, x, o)

    def _eager_item(self, s: int, j: int, t: int, k: int, n: int, lengths: list[int], state: dict, xs: dict,
                    o, out: dict, keep_logits: bool, step_sends: list) -> None:
        """Slice s of micro-batch j, one host launch per op: the previous layer's post-attention
        with its output o (B_j, 1, Hq, d) (k = 0: the last layer's, the head and the token), then
        layer k's pre-attention and its sends (and the residual's migration)."""
        lay, L = self.layout, self.args.n_layers
        b0, b1 = lay.rows(j)
        dev = state["logits"].device
        if k == 0:
            if s == 0:
                lg = state["logits"][b0:b1]
            else:
                x = self._post(L - 1, xs[j], o)
                lg = self.model.logits(x)[:, -1]
            tok = lg.argmax(dim=-1)
            out[(j, t)] = (tok, lg if keep_logits else None)      # to the host after the loop
            x = self.model.tok_embeddings(tok[:, None]) if t < n - 1 else None   # t = n-1: done
        else:
            x = self._post(k - 1, xs[j], o)
        if x is not None:
            if self._rope[0] != (j, t):                  # once per micro-batch and token, not per layer
                pos = torch.tensor([lengths[b] + t for b in range(b0, b1)], device=dev)
                cos, sin = self.model.rope(pos, torch.float64 if self.dtype == torch.float64 else torch.float32)
                self._rope = (j, t), (cos[:, None, :], sin[:, None, :])   # (B_j, 1, d): per-row
            self._pre(k, x, *self._rope[1], step_sends)
            nxt = lay.model_rank(j, s + 1)
            if nxt == self.rank:
                xs[j] = x
            else:
                with ctx_phase(self.ctx, "migrate"):
                    step_sends.append(self._isend(x.contiguous(), nxt, TAG_X))

    def _model_pieces(self, lengths: list[int], n: int) -> dict:
        """Graph mode: per micro-batch its :class:`hpcattn.model.lamina.steps.ModelSlices` and the
        captured pieces - one per layer k (the slice ending with layer k's sends) and the last
        slice of a generation - captured once per (lengths, n) and replayed by every generation."""
        def build() -> dict:
            segs, pieces = [], []
            for j in range(self.layout.microbatches):
                b0, b1 = self.layout.rows(j)
                seg = ModelSlices(self.model, b1 - b0, self.layout.attention_ranks, self.decode_products,
                                  prompt_lengths=lengths[b0:b1])
                saved = [x.clone() for x in seg.state()]
                got = {k: graph.StepGraph(lambda k=k, seg=seg: seg.slice(k), warmup=1)
                       for k in range(self.args.n_layers)}
                got["last"] = graph.StepGraph(seg.last, warmup=1)
                for x, v in zip(seg.state(), saved):               # undo the warm-up calls
                    x.copy_(v)
                segs.append(seg)
                pieces.append(got)
            return {"segs": segs, "pieces": pieces}

        return self._captured(lengths, n, build)

    def _model_item(self, seg, s: int, j: int, t: int, k: int, n: int, lengths: list[int], state: dict,
                    x_in, out: dict, keep_logits: bool, step_sends: list) -> None:
        """Graph mode: slice s of micro-batch j as one replay of its captured piece (s = 0: the
        same slice eagerly, from the prefill's logits), then its sends from the static buffers.
        ``x_in``: the residual stream (B_j, 1, dim) migrated from another model rank, or None."""
        lay = self.layout
        b0, b1 = lay.rows(j)
        pieces = self._graphs["pieces"][j]
        if x_in is not None:
            seg.x.copy_(x_in.view_as(seg.x))
        if k == 0:
            if s == 0:
                lg = state["logits"][b0:b1]
                seg.token.copy_(lg.argmax(dim=-1))
                seg.pos.copy_(seg.base)
                self._replay(j, 0, seg.begin, captured=False)  # eager: once per generation
            else:
                torch.add(seg.base, t - 1, out=seg.pos)        # the slice advances it to base + t
                lg = self._replay(j, 0, pieces[0] if t < n - 1 else pieces["last"])
            seg.t = t
            out[(j, t)] = (seg.token.clone(), lg.clone() if keep_logits else None)
            if t == n - 1:
                return
        else:
            if seg.t != t:                                     # rotation: token t began on another model rank
                seg.position(t)
                seg.t = t
            self._replay(j, k, pieces[k])
        M = lay.model_ranks
        reqs = []
        with ctx_phase(self.ctx, "q"):
            reqs += [self._isend(seg.q_out[k][ai], M + ai, TAG_Q) for ai in range(lay.attention_ranks)]
        with ctx_phase(self.ctx, "kv"):
            reqs += [self._isend(seg.kv_out[k][ai], M + ai, TAG_KV) for ai in range(lay.attention_ranks)]
        self._inflight[(j, k)] = reqs
        step_sends.extend(reqs)
        nxt = lay.model_rank(j, s + 1)
        if nxt != self.rank:
            with ctx_phase(self.ctx, "migrate"):
                step_sends.append(self._isend(seg.x.clone().view(b1 - b0, 1, -1), nxt, TAG_X))

    def _model_decode(self, state: dict, lengths: list[int], n: int, clock: _Clock, keep_logits: bool) -> dict:
        lay, a = self.layout, self.args
        L, M, A = a.n_layers, lay.model_ranks, lay.attention_ranks
        dev = state["logits"].device
        g_size = a.n_heads // A
        items = [(s, j) for s in range(self._slices(n)) for j in range(lay.microbatches)
                 if lay.model_rank(j, s) == self.rank]
        posted: dict = {}
        xs: dict[int, torch.Tensor] = {}
        out: dict[tuple[int, int], tuple] = {}          # (j, t) -> (tokens, logits) sampled here
        sends: deque = deque((0, r) for r in state["sends"])          # (step, request), waited a step late
        self._rope = (None, None)                        # (j, t) and its (cos, sin): the item in hand (eager)
        segs = self._model_pieces(lengths, n)["segs"] if self.graph_on else None
        for seg in segs or ():
            seg.t = None

        def post(item):
            s, j = item
            if item in posted or s == 0:
                return
            b0, b1 = lay.rows(j)
            o = (segs[j].o_in[(s - 1) % L] if segs is not None else
                 torch.empty(A, b1 - b0, 1, g_size, a.head_dim, dtype=self.dtype, device=dev))
            reqs = [self.ctx.world.irecv(o[ai], M + ai, TAG_OUT) for ai in range(A)]
            x = None
            if M > 1:                            # the residual stream migrates with the slice
                x = torch.empty(b1 - b0, 1, a.dim, dtype=self.dtype, device=dev)
                reqs.append(self.ctx.world.irecv(x, lay.model_rank(j, s - 1), TAG_X))
            posted[item] = (o, x, reqs)

        for s, j in _posting_ahead(items, post):
            step = self._step_of(s, n)
            t, k = divmod(s, L)
            b0, b1 = lay.rows(j)
            o = None
            if s > 0:
                o, x_in, reqs = posted.pop((s, j))
                clock.waited(step, reqs)
                if segs is None:
                    o = o.permute(1, 2, 0, 3, 4).reshape(b1 - b0, 1, a.n_heads, a.head_dim)
                if x_in is not None:
                    xs[j] = x_in
            c0 = time.perf_counter()
            step_sends: list = []
            if segs is not None:
                self._model_item(segs[j], s, j, t, k, n, lengths, state, xs.pop(j, None), out, keep_logits,
                                 step_sends)
            else:
                self._eager_item(s, j, t, k, n, lengths, state, xs, o, out, keep_logits, step_sends)
            clock.computed(step, c0)
            clock.finished(step)
            sends.extend((step, r) for r in step_sends)
            while sends and sends[0][0] < step - 1:
                sends.popleft()[1].wait()
        for _, r in sends:
            r.wait()
        return {jt: (tok.cpu(), None if lg is None else lg.cpu()) for jt, (tok, lg) in out.items()}

    # -- attention ranks -----------------------------------------------------------------------
    def _attention_prefill(self, lengths: list[int], n: int) -> dict:
        """Allocate the head-split cache and post the receives of the prompt KV hand-over."""
        lay, a = self.layout, self.args
        ai = self.rank - lay.model_ranks
        lo, hi = lay.kv_heads(ai)
        h = hi - lo
        dev = self.ctx.device
        cache = (self._attention_pieces(lengths, n)["cache"] if self.graph_on else
                 ShardedKVCache(a.n_layers, lay.batch, h, a.head_dim, max(lengths) + n - 1, self.dtype, dev))
        pending = [[] for _ in range(a.n_layers)]     # per layer: (buffer, request, rows, token indices)
        for plen, rows in _length_groups(lengths):
            for r in range(lay.model_ranks):
                idx = kept_indices(self.prefill_method, self.ring_layout, plen, lay.model_ranks, r).to(dev)
                for layer in range(a.n_layers):
                    buf = torch.empty(2, len(rows), h, len(idx), a.head_dim, dtype=self.dtype, device=dev)
                    pending[layer].append((buf, self.ctx.world.irecv(buf, r, TAG_PROMPT_KV), rows, idx))
        return {"cache": cache, "pending": pending}

    def _attention_pieces(self, lengths: list[int], n: int) -> dict:
        """Graph mode: the head-split cache (static: the pieces read it by address), per
        micro-batch its :class:`hpcattn.model.lamina.steps.AttentionRole` (rows of the micro-batch,
        device lengths and slots) and one captured piece per layer (Lean over the prefix, the new
        token's fold, its append; the last layer's also advances the lengths), captured once per
        (lengths, n) and replayed by every generation."""
        lay, a = self.layout, self.args
        ai = self.rank - lay.model_ranks
        lo, hi = lay.kv_heads(ai)
        qlo, qhi = lay.q_heads(ai)
        L = a.n_layers

        def piece(role, k: int) -> None:
            role.layer(k)
            if k == L - 1:
                role.advance()

        def build() -> dict:
            cache = ShardedKVCache(L, lay.batch, hi - lo, a.head_dim, max(lengths) + n - 1, self.dtype,
                                   self.ctx.device)
            roles, pieces = [], []
            for j in range(lay.microbatches):
                b0, b1 = lay.rows(j)
                role = AttentionRole(self._lean, cache, qhi - qlo, rows=(b0, b1), prefix=lengths[b0:b1])
                pieces.append({k: graph.StepGraph(lambda k=k, role=role: piece(role, k), warmup=1) for k in range(L)})
                role.set_prefix(lengths[b0:b1])                   # undo the warm-up calls' advance
                roles.append(role)
            return {"cache": cache, "roles": roles, "pieces": pieces}

        return self._captured(lengths, n, build)

    def _attention_decode(self, state: dict, lengths: list[int], n: int, clock: _Clock) -> None:
        lay, a = self.layout, self.args
        L, M = a.n_layers, lay.model_ranks
        ai = self.rank - M
        lo, hi = lay.kv_heads(ai)
        h, qlo, qhi = hi - lo, *lay.q_heads(ai)
        G = a.n_heads // a.n_kv_heads
        cache, pending = state["cache"], state["pending"]
        dev = self.ctx.device
        items = [(s, j) for s in range((n - 1) * L) for j in range(lay.microbatches)]
        posted: dict = {}
        sends: deque = deque()
        ragged = len(set(lengths)) > 1

        roles = self._graphs["roles"] if self.graph_on else None
        if roles is not None:
            for j, role in enumerate(roles):
                role.set_prefix(lengths[role.b0:role.b1])

        def post(item):
            if item in posted:
                return
            s, j = item
            b0, b1 = lay.rows(j)
            src = lay.model_rank(j, s)
            if roles is not None:                   # graph mode: the static buffers of its piece
                q, kv = roles[j].q[s % L], roles[j].kv[s % L]
            else:
                q = torch.empty(b1 - b0, 1, qhi - qlo, a.head_dim, dtype=self.dtype, device=dev)
                kv = torch.empty(2, b1 - b0, 1, h, a.head_dim, dtype=self.dtype, device=dev)
            posted[item] = (q, kv, self.ctx.world.irecv(q, src, TAG_Q), self.ctx.world.irecv(kv, src, TAG_KV))

        for s, j in _posting_ahead(items, post):
            t, k = divmod(s, L)
            step = t
            if pending[k]:                                   # first use of layer k: the hand-over
                clock.waited(step, [p[1] for p in pending[k]])
                c0 = time.perf_counter()
                for buf, _, rows, idx in pending[k]:
                    for gi, b in enumerate(rows):
                        cache.buf[k, :, b, :, idx] = buf[:, gi]
                pending[k] = []
                clock.computed(step, c0)
            q, kv, rq, rkv = posted.pop((s, j))
            b0, b1 = lay.rows(j)
            if roles is not None:
                clock.waited(step, [rq, rkv])
                c0 = time.perf_counter()
                self._replay(j, k, self._graphs["pieces"][j][k])
                with ctx_phase(self.ctx, "out"):
                    req = self._isend(roles[j].o[k], lay.model_rank(j, s + 1), TAG_OUT)
                self._inflight[(j, k)] = [req]
                clock.computed(step, c0)
                clock.finished(step)
                sends.append((step, req))
                while sends and sends[0][0] < step - 1:
                    sends.popleft()[1].wait()
                continue
            prefix = [lengths[b] + t for b in range(b0, b1)]
            clock.waited(step, [rq])
            c0 = time.perf_counter()
            kc, vc = cache.view(k, max(prefix))
            kc, vc = kc[b0:b1], vc[b0:b1]
            o_prev, lse_prev = self.kernel(q, kc, vc, scale=self.scale, k_lengths=prefix if ragged else None)
            clock.computed(step, c0)
            clock.waited(step, [rkv])
            c0 = time.perf_counter()
            out = fold_new_token(q, kv, o_prev, lse_prev, self.scale, G)
            append_new_token(cache.buf[k], kv, range(b0, b1), prefix)
            with ctx_phase(self.ctx, "out"):
                req = self._isend(out, lay.model_rank(j, s + 1), TAG_OUT)
            clock.computed(step, c0)
            clock.finished(step)
            sends.append((step, req))
            while sends and sends[0][0] < step - 1:
                sends.popleft()[1].wait()
        for _, r in sends:
            r.wait()


def _posting_ahead(items: list[tuple[int, int]], post) -> Iterator[tuple[int, int]]:
    """Yield the (slice, micro-batch) ``items`` in order, posting each one's receives (``post``)
    one item ahead, as "When receives are posted" in the module docstring says: before the current
    item's work when the next item is another micro-batch's, after it (when the loop asks for the
    next item) when it is the same micro-batch's, whose receives depend on this item's own sends."""
    if items:
        post(items[0])
    for i, item in enumerate(items):
        ahead = items[i + 1] if i + 1 < len(items) else None
        early = ahead is not None and ahead[1] != item[1]
        if early:
            post(ahead)
        yield item
        if ahead is not None and not early:
            post(ahead)


# -- the compute pieces (also timed by the cost model's measurements) ---------------------------------


def ctx_phase(ctx, name: str):
    """Count the bytes sent inside the block under phase ``name``."""
    return ctx.counters.phase(name)


def _length_groups(lengths: list[int]) -> list[tuple[int, list[int]]]:
    """[(prompt length, sequence indices with it)] in increasing length order."""
    groups: dict[int, list[int]] = {}
    for b, n in enumerate(lengths):
        groups.setdefault(n, []).append(b)
    return sorted(groups.items())


# -- one-process reference ------------------------------------------------------------------------

def reference_generate(model, kernel: Kernel, tokens: torch.Tensor, lengths: list[int], new_tokens: int):
    """One process, local prefill and decode: (tokens (B, n), logits (n, B, vocab)); a ragged batch
    runs one sequence at a time (the model runner has no ragged prompts)."""
    if len(set(lengths)) == 1:
        return ModelRunner(model, None, kernel, prefill="local", decode="local").generate(
            tokens[:, :lengths[0]], new_tokens)
    toks, logits = [], []
    for b, n in enumerate(lengths):
        t, lg = ModelRunner(model, None, kernel, prefill="local", decode="local").generate(
            tokens[b:b + 1, :n], new_tokens)
        toks.append(t)
        logits.append(lg)
    return torch.cat(toks), torch.cat(logits, dim=1)
