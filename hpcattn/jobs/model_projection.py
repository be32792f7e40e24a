"""Model-level projection of a P-host prefill (+ query pass + greedy decode) from one device.

``hpcattn project CONFIG`` with a ``job: generate`` config. For each sweep point and each prefill
method of the config (local, ring with its layouts, Star, APB with its compressors) the whole
model runs the way a P-rank ``hpcattn run`` runs it - the same :class:`~hpcattn.model.runner.ModelRunner`,
:mod:`~hpcattn.model.approx_prefill` and methods - in two passes:

1. **Recording**: the P ranks as P threads of this process (:class:`~hpcattn.comm.threaded.ThreadWorld`),
   their collectives met in memory; every rank's calls are logged with what they returned. The
   tokens and logits are those of a real P-rank run (tested against ``mpiexec -n P``).
2. **Timing**: each host alone (:class:`~hpcattn.comm.threaded.ReplayComm` answers its calls from
   its log; the ring's KV blocks come from the other hosts' caches of pass 1), device-synchronised
   around the prefill and around each decode step. After a warm-up run, an instrumented run splits the host's
   prefill into the APB paper's per-block parts (:class:`~hpcattn.timing.SegmentClock` through
   hooks on the model: ``qkv`` (RMSNorm, q/k/v products, RoPE), ``scoring`` (APB's compressor and
   top-lp selection), ``attention``, ``o_proj``, ``ffn`` (RMSNorm + MLP), ``others`` (embedding,
   residual adds, final norm, logits)), then ``run.repeats`` plain timed runs give the host's time.

Communication is not measured (one device) but modelled from the recorded payloads and a link
(``--link-gbps``, ``--latency-us``; measure yours with ``hpcattn check-comm``):

* all-gather: ``lat + (P - 1) * bytes_per_rank / bw`` (ring all-gather);
* broadcast: ``ceil(log2 P) * lat + bytes / bw`` (pipelined tree);
* all-reduce: ``2 * ceil(log2 P) * lat + 2 (P - 1) / P * bytes / bw``; barrier, control-plane
  calls: ``ceil(log2 P) * lat``;
* the ring's KV transfers overlap its attention: each of a prefill's ``L (P - 1)`` transfers
  exposes ``max(0, lat + bytes / bw - step)``, ``step`` = the host's attention time / ``(L P)``;
  in decode steps ring transfers are charged in full.

The critical host (largest compute + communication) sets the projected prefill; decode steps
likewise; end-to-end throughput is the APB paper's metric, (input + generated tokens) / (prefill +
decode time). Decode steps run eagerly for every method (CUDA graphs off), so the comparison
between methods is like for like; a real run of local/tree decode would capture its step.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import h5py
import numpy as np
import torch

from hpcattn import config as config_mod
from hpcattn.comm import CommContext
from hpcattn.comm.base import Counters
from hpcattn.comm.threaded import Call, CommLog, ReplayComm, run_threads
from hpcattn.config import from_dict, to_dict
from hpcattn.dtypes import DTYPES
from hpcattn.errors import ConfigError
from hpcattn.jobs.generate import GenerateJob, model_args, resolve_shape
from hpcattn.jobs.params import apb_params, star_geometry
from hpcattn.jobs.validate import validate
from hpcattn.kernels import select_kernel
from hpcattn.model.weights import random_model_on_device
from hpcattn.results.hdf5 import PROJECTION_KIND
from hpcattn.timing import SegmentClock, timed_runs

PARTS = ("qkv", "scoring", "comm", "attention", "o_proj", "ffn", "others")

# The APB paper (arXiv 2502.12085), 8 x A800, bf16, B = 1, 8 hosts.
# Table 14: prefill seconds (Llama-3.1-8B; la/lp 1K/0.5K at 32K, 2K/1K at 64K, 4K/2K from 128K).
PAPER_PREFILL_S = {
    "local": {32768: 3.46, 65536: 9.51, 131072: 30.01},
    "ring": {32768: 0.72, 65536: 2.00, 131072: 6.34, 262144: 21.80, 524288: 81.62},
    "star": {32768: 0.67, 65536: 1.43, 131072: 3.50, 262144: 9.63, 524288: 30.43},
    "apb": {32768: 0.49, 65536: 1.09, 131072: 2.79, 262144: 5.53, 524288: 13.39},
}
# Table 18: end-to-end tok/s (Llama-3-8B-1M, RULER, 20 samples per task).
PAPER_TOK_S = {
    "local": {32768: 7883, 65536: 6191, 131072: 4086},
    "ring": {32768: 22743, 65536: 22062, 131072: 17822, 262144: 11358, 524288: 6255},
    "star": {32768: 24479, 65536: 26643, 131072: 29600, 262144: 24045, 524288: 16177},
    "apb": {32768: 29892, 65536: 33738, 131072: 37575, 262144: 30457, 524288: 26102},
}
# Table 16: ms per transformer block of the critical host at 128K (Llama-3.1-8B).
PAPER_BLOCK_MS_128K = {
    "star": {"attention": 41.84, "ffn": 50.01, "total": 111.37},
    "apb": {"attention": 34.07, "ffn": 30.76, "scoring": 1.72, "comm": 0.62, "total": 80.18},
}
# Paper baselines: ring = contiguous (no zigzag), Star anchor = block.
PAPER_VARIANT = {"local": "", "ring": "contiguous", "star": "anchor=block", "apb": "query_aware"}


# -- link model ------------------------------------------------------------------------------------

@dataclass
class Link:
    """A link of ``gbps`` GB/s and ``latency_us`` microseconds per message, between P hosts."""

    gbps: float
    latency_us: float

    def cost(self, call: Call, P: int) -> float:
        """Seconds of one recorded call (not overlapped); see the module docstring."""
        bw, lat = self.gbps * 1e9, self.latency_us * 1e-6
        hops = math.ceil(math.log2(P)) if P > 1 else 0
        b = call.nbytes
        if P == 1:
            return 0.0
        if call.op == "allgather":
            return lat + (P - 1) * b / bw
        if call.op == "broadcast":
            return hops * lat + b / bw
        if call.op == "allreduce":
            return 2 * hops * lat + 2 * (P - 1) / P * b / bw
        if call.op == "sendrecv":
            return lat + b / bw
        return hops * lat                          # barrier, control-plane calls

    def phase_comm(self, calls: list[Call], P: int, overlap_step: float | None = None) -> float:
        """Seconds of ``calls``; sendrecv transfers each hide ``overlap_step`` seconds of compute."""
        total = 0.0
        for c in calls:
            t = self.cost(c, P)
            if c.op == "sendrecv" and overlap_step is not None:
                t = max(0.0, t - overlap_step)
            total += t
        return total


# -- FLOP counting and the per-block clock -------------------------------------------------------

class CountingKernel:
    """A :class:`~hpcattn.kernels.Kernel` that also counts the attention FLOPs of its calls
    (4 B Hq d per (query, key) pair the mask allows; lengths-masked calls count the full width)."""

    def __init__(self, kernel):
        self.kernel = kernel
        self.flops = 0.0

    def __getattr__(self, name):
        return getattr(self.kernel, name)

    def __call__(self, q, k, v, *, scale, causal="none", k_lengths=None):
        B, Sq, Hq, d = q.shape
        Sk = k.shape[1]
        if causal == "square":
            pairs = Sq * (Sq + 1) / 2
        elif causal == "bottom_right":
            pairs = Sq * Sk - Sq * (Sq - 1) / 2
        else:
            pairs = Sq * Sk
        self.flops += 4.0 * B * Hq * d * pairs
        return self.kernel(q, k, v, scale=scale, causal=causal, k_lengths=k_lengths)


def linear_flops(args, tokens: int, B: int) -> float:
    """FLOPs of every layer's products (q, k, v, o, gate, up, down) for ``tokens`` rows of B sequences."""
    a = args
    per_token = 2 * (a.dim * (a.n_heads + 2 * a.n_kv_heads) * a.head_dim + a.n_heads * a.head_dim * a.dim
                     + 3 * a.dim * a.ffn_dim)
    return float(per_token) * a.n_layers * tokens * B


@contextlib.contextmanager
def block_clock(model, runner, clock: SegmentClock, tokens_seen: list[int]):
    """Hooks that switch ``clock`` between the parts of :data:`PARTS` while the model runs (only
    while the clock runs: ``clock.label`` not None), and count the tokens the model embeds."""
    def to(label):
        def hook(*_):
            if clock.label is not None:
                clock.switch(label)
        return hook

    handles = [model.tok_embeddings.register_forward_pre_hook(
        lambda m, args: tokens_seen.append(args[0].shape[1]) if clock.label is not None else None)]
    for blk in model.layers:
        handles += [blk.attention_norm.register_forward_pre_hook(to("qkv")),
                    blk.attention.wo.register_forward_pre_hook(to("o_proj")),
                    blk.attention.wo.register_forward_hook(to("others")),
                    blk.ffn_norm.register_forward_pre_hook(to("ffn")),
                    blk.feed_forward.register_forward_hook(to("others"))]
    forward = model.forward

    def timed_forward(tok, pos, attend):
        def timed_attend(*a, **k):
            if clock.label is None:
                return attend(*a, **k)
            with clock("attention"):
                return attend(*a, **k)
        return forward(tok, pos, timed_attend)

    model.forward = timed_forward
    runner.phase_timer = clock
    try:
        yield
    finally:
        del model.forward                           # back to the class's forward
        for h in handles:
            h.remove()


# -- one method on P virtual hosts -----------------------------------------------------------------

@dataclass
class HostTiming:
    prefill_s: float                                # median over repeats
    decode_s: list[float]                           # median per decode step
    parts_s: dict[str, float]                       # instrumented prefill, per part (no comm)
    instrumented_s: float                           # the instrumented prefill's own span (parts sum to it)
    prefill_calls: list[Call]
    decode_calls: list[list[Call]]                  # per decode step
    model_tokens: int                               # tokens through the model in the prefill
    attn_flops: float                               # attention FLOPs of the prefill


@dataclass
class Projection:
    method: str
    variant: str
    hosts: int
    hosts_timing: list[HostTiming] = field(default_factory=list)
    tokens: torch.Tensor | None = None              # (B, new_tokens) of the recording pass
    logits: torch.Tensor | None = None              # (new_tokens, B, V) float32


def _context(comm, device: torch.device) -> CommContext:
    P = comm.size
    return CommContext(world=comm, node=comm, leaders=comm if comm.rank == 0 else None, device=device,
                       backend="emulated", transport="emulated", gpu_aware=False, gpu_aware_method="",
                       local_rank=comm.rank, node_index=0, node_ranks=[list(range(P))], counters=comm.counters)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _phase_timer(device, spans: dict, log: CommLog | None):
    @contextlib.contextmanager
    def timer(name):
        if log is not None:
            log.phase = name if name == "prefill" else f"decode{len(spans['decode'])}"
        _sync(device)
        t0 = time.perf_counter()
        yield
        _sync(device)
        spans[name].append(time.perf_counter() - t0)
    return timer


def record(job, case, P: int, device: torch.device, new_tokens: int):
    """Pass 1: the P ranks as threads. Returns per rank (tokens, logits, CommLog, KV cache or None)."""
    keep_cache = case.cfg.generate.prefill == "ring" or case.cfg.generate.decode == "ring"

    def body(rank, world):
        comm = world.comm(rank)
        runner = job.runner(case, _context(comm, device))
        spans = {"prefill": [], "decode": []}
        toks, logits = runner.generate(job.tokens, new_tokens, _phase_timer(device, spans, comm.log))
        return toks.cpu(), logits.cpu(), comm.log, runner.cache if keep_cache else None

    return run_threads(P, body)


def _ring_source(caches, P: int, n_layers: int):
    """``sendrecv_data`` of a replay: the i-th ring transfer of a layer-major schedule (P - 1 per
    layer, prefill then decode steps) carries the source host's [K | V] of that layer."""
    def fill(i: int, call: Call, recv: torch.Tensor) -> None:
        layer = (i // (P - 1)) % n_layers
        buf = caches[call.peer].buf[layer]           # (2, B, Hkv, cap, d), head-major as the wire
        width = min(recv.shape[3], buf.shape[3])
        recv[:, :, :, :width].copy_(buf[:, :, :, :width])
    return fill


def time_host(job, case, r: int, P: int, log: CommLog, caches, device, new_tokens: int,
              repeats: int) -> HostTiming:
    """Pass 2 for host r: one untimed warm-up generation (kernel selection, cuDNN's per-shape
    graphs, the allocator's growth), the instrumented one (per-part split of the prefill; it is also
    the first of the ``repeats`` timed ones: its hooks cost ~1%), then ``repeats - 1`` plain ones."""
    a = job.model.args
    replay = ReplayComm(r, P, log, Counters(), sendrecv_data=_ring_source(caches, P, a.n_layers) if caches else None)
    ctx = _context(replay, device)
    job.runner(case, ctx).generate(job.tokens, new_tokens)
    replay.rewind()
    base_kernel = job.kernel
    counting = CountingKernel(base_kernel)
    job.kernel = counting
    try:
        runner = job.runner(case, ctx)
    finally:
        job.kernel = base_kernel
    clock = SegmentClock(device)
    seen: list[int] = []
    spans = {"prefill": [], "decode": []}
    with block_clock(job.model, runner, clock, seen):
        phase = _phase_timer(device, spans, replay.log)

        @contextlib.contextmanager
        def timer(name):
            with phase(name):
                if name == "prefill":
                    clock.switch("others")
                yield
                if name == "prefill":
                    clock.switch(None)
        runner.generate(job.tokens, new_tokens, timer)
    parts = clock.collect()
    instrumented = spans["prefill"][0]
    prefill_calls = [c for c in replay.log.calls if c.phase == "prefill"]
    attn_flops, model_tokens = counting.flops, sum(seen)
    pre, dec = [instrumented], [spans["decode"]]
    for _ in range(repeats - 1):
        replay.rewind()
        spans = {"prefill": [], "decode": []}
        runner = job.runner(case, ctx)
        runner.generate(job.tokens, new_tokens, _phase_timer(device, spans, replay.log))
        pre.append(spans["prefill"][0])
        dec.append(spans["decode"])
    steps = [[c for c in replay.log.calls if c.phase == f"decode{i}"] for i in range(new_tokens - 1)]
    return HostTiming(float(np.median(pre)), np.median(np.asarray(dec), 0).tolist() if new_tokens > 1 else [],
                      parts, instrumented, prefill_calls, steps, model_tokens, attn_flops)


def project_method(job, case, P: int, device, new_tokens: int, repeats: int, method: str, variant: str,
                   log=print) -> Projection:
    """One method on P virtual hosts: record, then time every host alone."""
    proj = Projection(method, variant, P)
    if P == 1:
        logs = [(None, None, CommLog(), None)]
    else:
        t0 = time.perf_counter()
        logs = record(job, case, P, device, new_tokens)
        log(f"  {method} {variant}: recorded {P} ranks in {time.perf_counter() - t0:.1f} s")
        proj.tokens, proj.logits = logs[0][0], logs[0][1]
    caches = [x[3] for x in logs] if logs[0][3] is not None else None
    for r in range(P):
        proj.hosts_timing.append(time_host(job, case, r, P, logs[r][2], caches, device, new_tokens, repeats))
    return proj


def summarise(proj: Projection, link: Link, args, B: int, prompt: int, new_tokens: int) -> dict:
    """The projected figures of one method (critical host, per-block parts, throughput)."""
    P, L = proj.hosts, args.n_layers
    hosts = []
    for h in proj.hosts_timing:
        step = h.parts_s.get("attention", 0.0) / (L * P) if P > 1 else None
        comm = link.phase_comm(h.prefill_calls, P, overlap_step=step)
        dcomm = [link.phase_comm(c, P) for c in h.decode_calls]
        hosts.append({"prefill_compute_s": h.prefill_s, "prefill_comm_s": comm, "prefill_s": h.prefill_s + comm,
                      "decode_step_s": [d + c for d, c in zip(h.decode_s, dcomm)] if dcomm else list(h.decode_s)})
    crit = int(np.argmax([x["prefill_s"] for x in hosts]))
    prefill = hosts[crit]["prefill_s"]
    n_steps = new_tokens - 1
    steps = np.max(np.asarray([x["decode_step_s"] for x in hosts]), 0) if n_steps else np.zeros(0)
    decode = float(steps.sum())
    step = float(np.median(steps)) if n_steps else 0.0     # the median projected step
    h = proj.hosts_timing[crit]
    parts = {k: h.parts_s.get(k, 0.0) for k in PARTS if k != "comm"}
    parts["comm"] = hosts[crit]["prefill_comm_s"]
    linear_s = parts["qkv"] + parts["o_proj"] + parts["ffn"]
    lin_flops = linear_flops(args, h.model_tokens, B)
    return {
        "method": proj.method, "variant": proj.variant, "hosts": P, "context": prompt, "critical_host": crit,
        "prefill_compute_s": h.prefill_s, "prefill_comm_s": hosts[crit]["prefill_comm_s"], "prefill_s": prefill,
        "decode_steps": n_steps, "decode_step_s": step, "decode_s": decode,
        "tok_s": B * (prompt + new_tokens) / (prefill + decode),
        # the paper's NIAH answers are 128 tokens: the same metric with 127 median decode steps
        "tok_s_128": B * (prompt + 128) / (prefill + 127 * step),
        "block_ms": {k: v / L * 1e3 for k, v in parts.items()},
        "block_total_ms": sum(parts.values()) / L * 1e3,
        "instrumented_prefill_s": h.instrumented_s,
        "instrumented_parts_sum_s": sum(v for k, v in parts.items() if k != "comm"),
        "model_tokens": h.model_tokens, "linear_tflops": lin_flops / linear_s / 1e12 if linear_s else None,
        "attention_tflops": h.attn_flops / parts["attention"] / 1e12 if parts["attention"] else None,
        "host_prefill_s": [x["prefill_s"] for x in hosts],
    }


# -- variants of a config -------------------------------------------------------------------------

def variants(c, P: int) -> list[tuple[str, str, object]]:
    """(method, variant label, concrete config) of one expanded case, Star twice: anchor = block
    (the paper's setting) and anchor = APB's la (a compute-matched control), unless star.anchor
    is set."""
    g = c.generate
    ctx_len = c.shape.context - g.query_len
    m = g.prefill

    def with_(**kv):
        d = to_dict(c)
        for path, v in kv.items():
            a, b = path.split(".")
            d[a][b] = v
        d["run"]["cuda_graphs"] = "false"
        return from_dict(d)

    if m == "local":
        return [("local", "one GPU", with_(**{"generate.decode": "local"}))]
    if m == "ring":
        return [("ring", c.ring.layout, with_())]
    if m == "star":
        block = star_geometry(c, P, ctx_len)[0]
        if c.star.anchor is not None:
            return [("star", f"anchor={c.star.anchor}", with_())]
        la = apb_params(c, P, ctx_len).la
        out = [("star", "anchor=block", with_(**{"star.anchor": block}))]
        if la != block:
            out.append(("star", "anchor=la", with_(**{"star.anchor": la})))
        return out
    prm = apb_params(c, P, ctx_len)
    return [("apb", f"{c.apb.compressor} la{prm.la}/lp{prm.lp}", with_())]


# -- the command -------------------------------------------------------------------------------------

def device_rates(device, kernel, args, dtype, n: int) -> dict:
    """Measured rates of this device: a large product (TF/s) and square-causal attention of
    (1, n, Hq, d) with this run's kernel (TF/s)."""
    size = 8192 if device.type == "cuda" else 512
    x = torch.randn(size, size, dtype=dtype, device=device)
    _, ts = timed_runs(lambda: x @ x, device, 3)
    mm = 2 * size ** 3 / min(ts) / 1e12
    q = torch.randn(1, n, args.n_heads, args.head_dim, dtype=dtype, device=device)
    k = torch.randn(1, n, args.n_kv_heads, args.head_dim, dtype=dtype, device=device)
    _, ts = timed_runs(lambda: kernel(q, k, k, scale=args.head_dim ** -0.5, causal="square"), device, 3)
    att = 4 * args.n_heads * args.head_dim * n * (n + 1) / 2 / min(ts) / 1e12
    return {"matmul_tflops": mm, "causal_attention_tflops": att, "causal_attention_n": n}


def run_model_projection(cfg, hosts: int, gbps: float, latency_us: float, output: str | None,
                         log=print, more_links: tuple[float, ...] = ()) -> list[dict]:
    """``hpcattn project`` of a generate config: every sweep point, every method's P-host run on
    this device; prints the tables beside the APB paper's and returns the rows (HDF5 with -o).
    ``more_links``: further link bandwidths (GB/s, same latency) the same measurements are
    projected for (rows carry ``link_gbps``)."""
    if hosts < 2:
        raise ConfigError("hpcattn project: --hosts must be >= 2")
    links = [Link(g, latency_us) for g in (gbps, *more_links)]
    device = torch.device(config_mod.resolve_device(cfg, torch.cuda.is_available()))
    if device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    one = SimpleNamespace(device=device, rank=0, size=1)
    rows, seen, model, rates = [], set(), None, None
    for point, c in config_mod.expand_cases(cfg):
        if c.generate.decode == "lamina":
            raise ConfigError("hpcattn project: generate.decode=lamina is not projected (use hpcattn lamina-cost)")
        resolve_shape(c)
        world = 1 if c.generate.prefill == "local" else hosts
        validate(c, world, device.type == "cuda", source="project")
        dtype = DTYPES[c.shape.dtype]
        for method, variant, vc in variants(c, hosts):
            key = (method, variant, vc.shape.context, vc.shape.batch, vc.generate.decode, vc.shape.dtype)
            if key in seen:
                continue
            seen.add(key)
            kernel = select_kernel(vc.kernel.backend, device, dtype, c.shape.head_dim)
            mkey = (c.model.path, c.model.preset, c.model.layers, c.model.seed, c.shape.dtype)
            if model is None or model[0] != mkey:
                model = None
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                # timing on a GPU: random weights drawn on the device (an 8B shape's seeded CPU
                # initialisation takes minutes); CPU runs keep the seeded weights of a real run
                built = random_model_on_device(model_args(vc), dtype, device) \
                    if device.type == "cuda" and not c.model.path else GenerateJob(vc, one, kernel).model
                model = (mkey, built)
            job = GenerateJob(vc, one, kernel, model=model[1])
            P = 1 if method == "local" else hosts
            a = job.model.args
            t0 = time.perf_counter()
            proj = project_method(job, SimpleNamespace(cfg=vc), P, device, vc.generate.new_tokens, vc.run.repeats,
                                  method, variant, log)
            wall = time.perf_counter() - t0
            if rates is None:
                rates = device_rates(device, kernel, a, dtype, min(c.shape.context // hosts * 2, 32768))
            for link in links:
                row = summarise(proj, link, a, vc.shape.batch, vc.shape.context, vc.generate.new_tokens)
                row |= {"layers": a.n_layers, "dtype": vc.shape.dtype, "decode": vc.generate.decode,
                        "wall_s": wall, "link_gbps": link.gbps, "latency_us": link.latency_us,
                        "linear_pct_of_matmul": (row["linear_tflops"] or 0) / rates["matmul_tflops"] * 100,
                        "attention_pct_of_causal": (row["attention_tflops"] or 0) / rates["causal_attention_tflops"] * 100}
                rows.append(row)
            row = rows[-len(links)]
            log(f"  {method:5} {variant:24} N={vc.shape.context:>7} prefill {row['prefill_s']:.3f} s "
                f"(host {row['critical_host']}: compute {row['prefill_compute_s']:.3f} + comm "
                f"{row['prefill_comm_s']:.4f}), decode {row['decode_step_s'] * 1e3:.2f} ms/step, "
                f"{row['tok_s']:.0f} tok/s  [{wall:.0f} s]")
            del job, proj
            if device.type == "cuda":
                torch.cuda.empty_cache()
    order = list(PAPER_VARIANT)                       # local, ring, star, apb; variants in config order
    rows.sort(key=lambda r: (r["link_gbps"] != gbps, r["link_gbps"], r["context"], order.index(r["method"])))
    add_speedups(rows)
    for link in links:
        for line in tables([r for r in rows if r["link_gbps"] == link.gbps], hosts, link, rates, device):
            log(line)
    if output:
        write_record(output, cfg, rows, hosts, links, rates, device)
        log(f"wrote {output}")
    return rows


def add_speedups(rows: list[dict]) -> None:
    """``apb_speedup``: each row's projected prefill over the APB row (first APB variant) of the same context."""
    for r in rows:
        apb = next((x for x in rows if x["method"] == "apb" and x["context"] == r["context"]
                    and x.get("link_gbps") == r.get("link_gbps")), None)
        r["apb_speedup"] = r["prefill_s"] / apb["prefill_s"] if apb else None
        paper = PAPER_PREFILL_S.get(r["method"], {}).get(r["context"])
        paper_apb = PAPER_PREFILL_S["apb"].get(r["context"])
        r["paper_prefill_s"] = paper
        r["paper_apb_speedup"] = paper / paper_apb if paper and paper_apb else None
        r["paper_tok_s"] = PAPER_TOK_S.get(r["method"], {}).get(r["context"])


def _f(x, fmt):
    return format(x, fmt) if x is not None else "-"


def tables(rows: list[dict], hosts: int, link: Link, rates: dict | None, device) -> list[str]:
    """The projection's tables: prefill with the paper's Table 14 beside it, the per-block parts
    (Table 16's layout), end-to-end throughput (Table 18's metric) and achieved rates."""
    name = str(device) + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "")
    layers = sorted({r["layers"] for r in rows})
    out = [f"model-level projection: {hosts} hosts, link {link.gbps:g} GB/s + {link.latency_us:g} us, "
           f"measured on {name}; {'/'.join(map(str, layers))} layers (the paper: 32, 8 x A800)"]
    out.append(f"{'method':6} {'variant':26} {'N':>7} {'prefill s':>10} {'comm s':>8} {'APB x':>6} "
               f"{'paper s':>8} {'paper x':>8} {'step ms':>8} {'tok/s':>9} {'tok/s@128':>9} {'paper tok/s':>11}")
    for r in rows:
        out.append(f"{r['method']:6} {r['variant']:26} {r['context']:>7} {r['prefill_s']:>10.3f} "
                   f"{r['prefill_comm_s']:>8.4f} {_f(r['apb_speedup'], '6.2f'):>6} {_f(r['paper_prefill_s'], '8.2f'):>8} "
                   f"{_f(r['paper_apb_speedup'], '8.2f'):>8} {r['decode_step_s'] * 1e3:>8.2f} {r['tok_s']:>9.0f} "
                   f"{r['tok_s_128']:>9.0f} {_f(r['paper_tok_s'], '11.0f'):>11}")
    out.append("APB x: this row's prefill / APB's (first APB variant); paper x likewise from Table 14 (ring there: "
               "contiguous; Star: anchor = block); tok/s: (B (N + generated)) / (prefill + decode), measured "
               "tokens; tok/s@128: 128 generated tokens (the paper's NIAH) at the median step")
    out.append("per transformer block of the critical host, ms (APB paper Table 16 layout; its 128K values in [])")
    out.append(f"{'method':6} {'variant':26} {'N':>7} " + " ".join(f"{p:>9}" for p in PARTS) + f" {'total':>9}")
    for r in rows:
        paper = PAPER_BLOCK_MS_128K.get(r["method"], {}) if r["context"] == 131072 else {}
        cells = [f"{r['block_ms'][p]:.2f}" + (f"[{paper[p]:g}]" if p in paper else "") for p in PARTS]
        total = f"{r['block_total_ms']:.2f}" + (f"[{paper['total']:g}]" if "total" in paper else "")
        out.append(f"{r['method']:6} {r['variant']:26} {r['context']:>7} " + " ".join(f"{x:>9}" for x in cells)
                   + f" {total:>9}")
    if rates:
        out.append(f"device rates: matmul {rates['matmul_tflops']:.3g} TF/s, causal attention "
                   f"{rates['causal_attention_tflops']:.3g} TF/s at n={rates['causal_attention_n']}")
        for r in rows:
            out.append(f"  {r['method']:6} {r['variant']:26} {r['context']:>7} linear {_f(r['linear_tflops'], '.3g')} TF/s "
                       f"({r['linear_pct_of_matmul']:.0f}%), attention {_f(r['attention_tflops'], '.3g')} TF/s "
                       f"({r['attention_pct_of_causal']:.0f}%)")
    return out


def write_record(output: str, cfg, rows: list[dict], hosts: int, links: list[Link], rates: dict | None,
                 device) -> None:
    """The projection as an HDF5 record (``kind`` = projection, ``level`` = model), written whole
    to ``OUTPUT.tmp`` and renamed."""
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    tmp = f"{output}.tmp"
    with h5py.File(tmp, "w") as f:
        f.attrs["kind"] = PROJECTION_KIND
        f.attrs["level"] = "model"
        f.attrs["hosts"] = hosts
        f.attrs["link_gbps"] = links[0].gbps
        f.attrs["more_links_gbps"] = [x.gbps for x in links[1:]]
        f.attrs["latency_us"] = links[0].latency_us
        f.attrs["device"] = str(device) + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "")
        f.attrs["device_rates_json"] = json.dumps(rates or {})
        f.attrs["config_yaml"] = config_mod.to_yaml(cfg)
        f.create_dataset("rows_json", data=json.dumps(rows))
    os.replace(tmp, output)
