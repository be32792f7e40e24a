"""Lamina's cost model (:mod:`hpcattn.model.lamina.cost`: step time, throughput and the batch the
memory allows, against colocated decode) fed with measurements, and the ``hpcattn lamina-cost``
command that prints its projection table.

The measurement functions time one device two ways: eager (:func:`measure_mtime`,
:func:`measure_atime`: the ops as hpcattn's Lamina path runs them, one host launch each) and with
each role's step captured in a CUDA graph (:func:`measure_mtime_graph`, :func:`measure_atime_graph`,
over :mod:`hpcattn.model.lamina.steps`; CUDA only); :func:`measure_colocated` times the model
runner's colocated step either way, for the comparison measured the same way; :func:`measure_link`
times the link between two ranks (ping-pong). ``benchmarks/lamina_measure.py`` writes them to a
file, :func:`load_measurements` reads it back for the command (:func:`run_cli`; its arguments are
in :mod:`hpcattn.cli`).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from hpcattn import graph
from hpcattn.errors import InputError
from hpcattn.kernels import empty_head_major
from hpcattn.model import lamina
from hpcattn.model.kv_cache import ShardedKVCache
from hpcattn.model.lamina.cost import Link, Measurements, projection_table
from hpcattn.model.runner import ModelRunner
from hpcattn.timing import timed_runs


def markdown(rows: list[dict]) -> str:
    if not rows:
        return ""
    keys = list(dict.fromkeys(k for r in rows for k in r))
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(fmt(r.get(k, "")) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


# -- measurement (one process; the benchmark and the validation test use these) ------------------

def _timed(fn, device, repeats: int, stat: str = "median") -> float:
    """Median (or ``stat="min"``: minimum, for a shared machine) seconds of fn() over ``repeats``
    runs after one warm-up (device-synchronised: :func:`hpcattn.timing.timed_runs`)."""
    with torch.inference_mode():
        ts = timed_runs(fn, device, repeats)[1]
    return float(np.min(ts) if stat == "min" else np.median(ts))


def measure_mtime(model, B: int, repeats: int = 5, n_layers: int | None = None, stat: str = "median") -> float:
    """MTIME(B): seconds of the non-attention work of one decode step at batch B - per layer the
    norm, q/k/v projections + RoPE, output projection, residual and FFN (the Lamina model slice's
    ops), plus embedding, final norm, head and argmax - scaled from the model's layers to
    ``n_layers`` (default: as many as it has)."""
    a = model.args
    w = model.tok_embeddings.weight
    dev, dt = w.device, w.dtype
    tok = torch.zeros(B, dtype=torch.int64, device=dev)
    cos, sin = model.rope(torch.full((B,), 100, device=dev), torch.float64 if dt == torch.float64 else torch.float32)
    cos, sin = cos[:, None, :], sin[:, None, :]
    o = torch.randn(B, 1, a.n_heads, a.head_dim, device=dev).to(dt)

    def layers():
        x = model.tok_embeddings(tok[:, None])
        for i in range(a.n_layers):
            h = model.layers[i].attention_norm(x)
            lamina.project_q(model, i, h, cos, sin)
            lamina.project_kv(model, i, h, cos, sin)
            x = lamina.finish_layer(model, i, x, o)
        return x

    def head():
        return model.logits(x0)[:, -1].argmax(-1)

    with torch.inference_mode():
        x0 = layers()
    t_layers, t_head = _timed(layers, dev, repeats, stat), _timed(head, dev, repeats, stat)
    return t_layers * (n_layers or a.n_layers) / a.n_layers + t_head


def measure_atime(kernel, B: int, l: int, n_heads: int, n_kv_heads: int, head_dim: int, dtype, device,
                  n_layers: int, repeats: int = 5, stat: str = "median") -> float:
    """ATIME(B, l): seconds of the attention work of one decode step - per layer the kernel over an
    l-token head-major cache (all heads), the new token's fold and its append to the cache (the
    attention rank's ops, eager) - for ``n_layers`` layers (one layer measured)."""
    torch.manual_seed(0)                               # values only matter for finiteness
    q = torch.randn(B, 1, n_heads, head_dim, device=device, dtype=dtype)
    cache = empty_head_major(B, l + 1, n_kv_heads, head_dim, dtype=dtype, device=device, lead=(2,)).normal_()
    kc, vc = cache[0, :, :l], cache[1, :, :l]          # (B, l, Hkv, d) head-major views: the prefix
    kv = torch.randn(2, B, 1, n_kv_heads, head_dim, device=device, dtype=dtype)
    scale, G = head_dim ** -0.5, n_heads // n_kv_heads
    buf, slots = cache.transpose(-3, -2), [l] * B      # (2, B, Hkv, l + 1, d): the new token's slot l

    def one():
        o, lse = kernel(q, kc, vc, scale=scale)
        out = lamina.fold_new_token(q, kv, o, lse, scale, G)
        lamina.append_new_token(buf, kv, range(B), slots)
        return out

    return _timed(one, torch.device(device), repeats, stat) * n_layers


def graph_blocker(device, dtype, head_dim: int) -> str | None:
    """Why the graph-captured timings cannot run on ``device`` (None: they can): they need CUDA
    and the Lean kernel (device lengths)."""
    if device.type != "cuda":
        return "CUDA graphs need a CUDA device (CPU: graph-captured timings skipped, eager only)"
    return graph.lean_for_graphs(device, dtype, head_dim)[1]


def measure_mtime_graph(model, B: int, repeats: int = 5, n_layers: int | None = None,
                        stat: str = "median") -> float:
    """MTIME(B) with the model rank's step captured in one CUDA graph (CUDA only): seconds of one
    replay of :meth:`hpcattn.model.lamina.steps.ModelRole.step` - embedding, every layer's fused
    pre-attention (norm, q/k/v, RoPE, into send buffers) and post-attention (o proj + residual,
    norm, FFN, from the receive buffer), final norm, head, argmax; no attention. Layers beyond the
    model's are scaled as in :func:`measure_mtime` (the head timed alone, also captured)."""
    a = model.args
    dev = model.tok_embeddings.weight.device
    with torch.inference_mode():
        role = lamina.ModelRole(model, B, pos=100)
        role.token.random_(0, a.vocab_size)
        role.hidden.normal_()
        step = graph.StepGraph(lambda: role.step(advance=False))
        t_step = _timed(step, dev, repeats, stat)
        if (n_layers or a.n_layers) == a.n_layers:
            return t_step
        t_head = _timed(graph.StepGraph(role.head_step), dev, repeats, stat)
    return (t_step - t_head) * n_layers / a.n_layers + t_head


def measure_atime_graph(kernel, B: int, l: int, n_heads: int, n_kv_heads: int, head_dim: int, dtype, device,
                        n_layers: int, repeats: int = 5, stat: str = "median", min_bytes: int = 256 << 20) -> float:
    """ATIME(B, l) with the attention rank's step captured in one CUDA graph (CUDA only;
    ``kernel``: Lean, device lengths): per layer the kernel over an l-token head-major cache, the
    new token's LSE fold and the append of its k, v
    (:meth:`hpcattn.model.lamina.steps.AttentionRole.step`). As many layers as make ``min_bytes``
    of KV (at most ``n_layers``; a repeated small cache would be read from L2) are captured and
    the replay scaled to ``n_layers``."""
    per_layer = 2 * B * l * n_kv_heads * head_dim * torch.empty(0, dtype=dtype).element_size()
    n = max(1, min(n_layers, -(-min_bytes // per_layer)))
    with torch.inference_mode():
        cache = ShardedKVCache(n, B, n_kv_heads, head_dim, l + 1, dtype, device)
        cache.buf.normal_()
        cache.length = l
        role = lamina.AttentionRole(kernel, cache, n_heads)
        role.q.normal_()
        role.kv.normal_()
        t = _timed(graph.StepGraph(lambda: role.step(advance=False)), torch.device(device), repeats, stat)
    return t * n_layers / n


def measure_colocated(model, kernel, B: int, l: int, graphs: bool, repeats: int = 5,
                      stat: str = "median") -> float:
    """Seconds of one colocated decode step of ``model`` (all its layers) at batch B over an
    l-token cache, as :class:`hpcattn.model.runner.ModelRunner` runs it on one device: eager
    (``graphs`` False: the plain model, ``kernel``) or captured (``graphs``: the runner's graph
    path, fused forward + Lean with device lengths; CUDA only). The cache grows by one token per
    step, as in a generation."""
    dev = model.tok_embeddings.weight.device
    r = ModelRunner(model, None, kernel, prefill="local", decode="local",
                    cuda_graphs="true" if graphs else "false", graph_cache={})
    with torch.inference_mode():
        r.prime(B, l, repeats + 2)
        r.cache.buf.normal_()
        tok = torch.zeros(B, dtype=torch.int64, device=dev)
        return _timed(lambda: r.decode_step(tok), dev, repeats, stat)


def measure(model, kernel, batches: list[int], contexts: list[int], repeats: int = 5,
            n_layers: int | None = None, device_name: str = "", note: str = "") -> Measurements:
    """MTIME at every batch and ATIME at every (batch, context) of ``model`` on its device."""
    a = model.args
    w = model.tok_embeddings.weight
    L = n_layers or a.n_layers
    per_layer = sum(p.numel() for n, p in model.named_parameters() if n.startswith("layers.0."))
    other = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("layers."))
    weights = (per_layer * L + other) * w.element_size()
    mt = {B: measure_mtime(model, B, repeats, L) for B in batches}
    at = [(B, l, measure_atime(kernel, B, l, a.n_heads, a.n_kv_heads, a.head_dim, w.dtype, w.device, L, repeats))
          for B in batches for l in contexts]
    return Measurements(L, a.dim, a.n_heads, a.n_kv_heads, a.head_dim, w.element_size(), weights, mt, at,
                        device=device_name or str(w.device), note=note)


def load_measurements(path: str, shape: str | None = None) -> Measurements:
    """Measurements from a JSON file: one :meth:`Measurements.to_json` object, a lamina-cost
    output (``measurements`` key), or the benchmark's file (``shapes``: the one named ``shape``,
    default the first)."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"lamina-cost: measurements file not found: {path}")
    try:
        d = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise InputError(f"lamina-cost: {path}: not JSON: {e}") from None
    if isinstance(d, dict) and "shapes" in d:
        names = [x.get("name") for x in d["shapes"]]
        if shape is not None and shape not in names:
            raise InputError(f"lamina-cost: {path}: no shape {shape!r} (has {', '.join(map(str, names))})")
        d = d["shapes"][names.index(shape) if shape is not None else 0]
    elif shape is not None:
        raise InputError(f"lamina-cost: --shape {shape!r}: {path} holds a single measurement set")
    return Measurements.from_json(d.get("measurements", d) if isinstance(d, dict) else d, path)


PAPER_DOPS = {"1+1": (1, 1), "2+2": (2, 2), "paper (1, 2) LLaMA-33B": (1, 2),
              "paper (2, 4) LLaMA-65B / LLaMA3-70B": (2, 4)}


def parse_dop(text: str) -> tuple[int, int]:
    try:
        a, b = (int(x) for x in text.replace("+", ",").split(","))
    except ValueError:
        raise InputError(f"lamina-cost: --dop {text!r}: expected A,B (model ranks, attention ranks), e.g. 2,4") from None
    if a < 1 or b < 1:
        raise InputError(f"lamina-cost: --dop {text!r}: both counts must be >= 1")
    return a, b


def run_cli(args) -> int:
    """``hpcattn lamina-cost``: print (and optionally write as JSON) the projection table."""
    meas = load_measurements(args.measurements, args.shape)
    if args.link_gbps <= 0 or args.latency_us < 0:
        raise InputError("lamina-cost: --link-gbps must be > 0 and --latency-us >= 0")
    link = Link(args.link_gbps * 1e9, args.latency_us * 1e-6)
    dops = [parse_dop(d) for d in args.dop] if args.dop else list(PAPER_DOPS.values())
    micro = [int(x) for x in args.microbatches.split(",")]
    batches = [int(x) for x in args.batch.split(",")]
    if any(x < 1 for x in micro + batches) or args.context < 1:
        raise InputError("lamina-cost: --microbatches, --batch and --context need positive integers")
    gib = 1 << 30
    rows = projection_table(meas, link, dops, micro, batches, args.context,
                            args.mem_gib_model * gib if args.mem_gib_model else None,
                            args.mem_gib_attention * gib if args.mem_gib_attention else None, args.model_split)
    print(f"# Lamina projection from {args.measurements} ({meas.device}; {meas.n_layers} layers); link "
          f"{args.link_gbps:g} GB/s, {args.latency_us:g} us one-way")
    print(markdown(rows))
    if args.output:
        Path(args.output).write_text(json.dumps({"measurements": meas.to_json(), "link": asdict(link),
                                                 "rows": rows}, indent=1))
        print(f"wrote {args.output}")
    return 0


def measure_link(ctx, peer: int, sizes: list[int], repeats: int = 20) -> dict[int, float]:
    """Ping-pong between this rank and ``peer`` through ``ctx.world`` isend/irecv (call on both):
    {bytes: one-way seconds}, half the median round trip timed on the lower of the two ranks and
    handed to the other, so both return the same figures.

    The timer of a round trip stops only after ``ctx.sync()``: over NCCL, ``isend`` / ``irecv`` and
    their ``wait()`` only enqueue the transfer and order the current stream after it, and the bytes
    move later on the device; the device sync waits for them (host-staged MPI's ``wait`` already
    blocks until the message is in place). The two ranks start each size together (a barrier)
    and discard two warm-up round trips (NCCL sets up a rank pair's channels on first use)."""
    out = {}
    first = ctx.rank < peer
    for n in sizes:
        buf = torch.zeros(max(n // 4, 1), dtype=torch.float32, device=ctx.device)
        rbuf = torch.empty_like(buf)
        ctx.sync()
        ctx.world.barrier()
        ts = []
        for i in range(repeats + 2):
            t0 = time.perf_counter()
            if first:
                ctx.world.isend(buf, peer, 0).wait()
                ctx.world.irecv(rbuf, peer, 0).wait()
            else:
                ctx.world.irecv(rbuf, peer, 0).wait()
                ctx.world.isend(buf, peer, 0).wait()
            ctx.sync()                       # the transfer itself, not its enqueue
            if i >= 2:
                ts.append(time.perf_counter() - t0)
        out[n] = float(np.median(ts)) / 2
    if first:
        ctx.world.mpi.send(out, dest=peer, tag=77)
        return out
    return ctx.world.mpi.recv(source=peer, tag=77)
