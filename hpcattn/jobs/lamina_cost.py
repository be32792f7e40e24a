"""Lamina cost model (spec lamina.md sections 4, 5.4, 6): step time, throughput and the batch the
memory allows, for a model ranks + b attention ranks with m micro-batches, against colocated
decode (``local`` replicas or ``tree``) on the same number of devices.

Inputs are measurements (:class:`Measurements`, written by ``benchmarks/lamina_measure.py`` or by
:func:`measure` here): MTIME(B), the non-attention time of one decode step (every layer's norms,
projections, FFN, plus embedding, head and sampling) at batch B; ATIME(B, l), the attention time
of one step (every layer, all heads, prefix of l tokens + the new token's merge); and a link
(bandwidth, one-way latency; ``hpcattn check-comm`` measures both).

Model (per decode step of L layers; micro-batch Bm = B/m; G = Hq/Hkv; e bytes per element):

* one model slice: t_m = MTIME(Bm) / L; one attention item on one of the b attention devices
  (it holds Hkv/b heads, so it reads as many KV bytes as Bm/b sequences of all heads):
  t_a = ATIME(Bm/b, l) / L;
* the per-layer exchange: (2 + 2/G) * Hq*d * e * Bm bytes (q and k, v out; the output back), one
  round trip: t_n = 2 * latency + bytes / bandwidth; with a > 1 the residual stream (dim * e * Bm)
  migrates between model devices while the attention runs;
* the step is bounded by the busiest resource and by one micro-batch's dependency chain:
  T = max(m L t_m / a, m L t_a, m L bytes / (min(a, b) bandwidth), L (t_m + t_n + t_a));
  throughput B / T tokens per second.

Model devices are full-weight ``replica``s (hpcattn's implementation: slices rotate over them)
or one ``tensor``-parallel group (W/a each, t_m / a per slice, ideal scaling: the paper's 65B/70B
setting, not implemented here).

Colocated on D = a + b devices: ``local``, D replicas with B/D sequences each:
T = MTIME(B/D) + ATIME(B/D, l); ``tree``, every device runs the non-attention part of all B and
attends its l/D share, then one merge per layer: T = MTIME(B) + ATIME(B, l/D) + L * 2 * latency;
``tp`` (the paper's vLLM baseline), ideal tensor parallelism: T = (MTIME(B) + ATIME(B, l)) / D +
2 all-reduces per layer (L * 4 * latency).

Memory: KV per sequence 2 * L * Hkv * d * e * l. Lamina's b attention devices hold only KV (no
weights): B_max = floor(b * mem_attention / kv_seq) (the model devices must hold the weights, or
W/a with ``tensor``); colocated: local D * floor((mem - W) / kv_seq), tree floor(D * (mem - W) /
kv_seq), tp floor((D * mem - W) / kv_seq).

The measurement functions below time one device two ways: eager (:func:`measure_mtime`,
:func:`measure_atime`: the ops as hpcattn's Lamina path runs them, one host launch each) and with
each role's step captured in a CUDA graph (:func:`measure_mtime_graph`, :func:`measure_atime_graph`,
over :mod:`hpcattn.model.lamina.steps`; CUDA only); :func:`measure_colocated` times the model
runner's colocated step either way, for the comparison measured the same way.

What it leaves out: activation memory, TP communication volume, kernel-launch and scheduling
overheads beyond the measured per-message latency, and contention between the overlapped phases.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from hpcattn.errors import InputError


@dataclass
class Measurements:
    """Measured times of one model shape on one device kind (seconds per decode step, all layers).

    mtime: {batch: seconds}; atime: [(batch, context, seconds)]; the model shape: n_layers, dim,
    n_heads, n_kv_heads, head_dim, elem_bytes (e), weight_bytes (W)."""

    n_layers: int
    dim: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    elem_bytes: int
    weight_bytes: int
    mtime: dict[int, float]
    atime: list[tuple[int, int, float]]
    device: str = ""
    note: str = ""
    _fit: tuple[float, float] | None = field(default=None, repr=False, compare=False)

    # -- interpolation ---------------------------------------------------------------------
    def mtime_at(self, B: float) -> float:
        """MTIME(B): piecewise-linear in B through the measured points, linear beyond them."""
        xs = sorted(self.mtime)
        ys = [self.mtime[x] for x in xs]
        if len(xs) == 1:
            return ys[0]
        if B <= xs[0]:
            i = 0
        elif B >= xs[-1]:
            i = len(xs) - 2
        else:
            i = max(k for k in range(len(xs) - 1) if xs[k] <= B)
        slope = (ys[i + 1] - ys[i]) / (xs[i + 1] - xs[i])
        return max(ys[i] + slope * (B - xs[i]), min(ys) if B < xs[0] else 0.0)

    def atime_at(self, B: float, l: float) -> float:
        """ATIME(B, l) = c0 + c1 * B * l, least squares over the measured (B, l) points (c >= 0)."""
        if self._fit is None:
            x = np.asarray([b * n for b, n, _ in self.atime], dtype=np.float64)
            y = np.asarray([t for _, _, t in self.atime], dtype=np.float64)
            if len(x) == 1 or np.ptp(x) == 0:
                c0, c1 = 0.0, float(y.mean() / x.mean())
            else:
                c1, c0 = np.polyfit(x, y, 1)
                if c0 < 0:
                    c0, c1 = 0.0, float((x @ y) / (x @ x))
                c1 = max(float(c1), 0.0)
            self._fit = (float(c0), c1)
        c0, c1 = self._fit
        return c0 + c1 * B * l

    def kv_bytes_per_seq(self, l: int) -> int:
        return 2 * self.n_layers * self.n_kv_heads * self.head_dim * self.elem_bytes * l

    def exchange_bytes_per_seq_layer(self) -> float:
        """(2 + 2/G) * Hq*d * e: q out, k and v out, the output back (spec section 4)."""
        G = self.n_heads / self.n_kv_heads
        return (2 + 2 / G) * self.n_heads * self.head_dim * self.elem_bytes

    # -- files -----------------------------------------------------------------------------
    def to_json(self) -> dict:
        d = asdict(self)
        d.pop("_fit")
        d["mtime"] = {str(k): v for k, v in self.mtime.items()}
        return d

    @classmethod
    def from_json(cls, d: dict, source: str = "measurements") -> "Measurements":
        try:
            return cls(n_layers=int(d["n_layers"]), dim=int(d["dim"]), n_heads=int(d["n_heads"]),
                       n_kv_heads=int(d["n_kv_heads"]), head_dim=int(d["head_dim"]),
                       elem_bytes=int(d["elem_bytes"]), weight_bytes=int(d["weight_bytes"]),
                       mtime={int(k): float(v) for k, v in d["mtime"].items()},
                       atime=[(int(b), int(n), float(t)) for b, n, t in d["atime"]],
                       device=str(d.get("device", "")), note=str(d.get("note", "")))
        except (KeyError, TypeError, ValueError) as e:
            raise InputError(f"{source}: not a Lamina measurements file ({type(e).__name__}: {e}); "
                             f"write one with benchmarks/lamina_measure.py") from None


@dataclass(frozen=True)
class Link:
    """bandwidth in bytes/s, latency one-way in seconds."""

    bandwidth: float
    latency: float


SPLITS = ("replica", "tensor")
COLOCATED = ("local", "tree", "tp")


def predict_lamina(meas: Measurements, link: Link, a: int, b: int, m: int, B: int, l: int,
                   split: str = "replica") -> dict:
    """Step time, throughput and bounds of Lamina DOP (a, b) with m micro-batches at batch B,
    context l (see the module docstring). ``split``: the a model devices are ``replica``s (full
    weights each; hpcattn's implementation, slices rotate over them) or one ``tensor``-parallel
    group (W/a each; every slice on all a, ideal scaling: the paper's 65B/70B setting)."""
    L = meas.n_layers
    Bm = B / m
    t_m = meas.mtime_at(Bm) / L / (a if split == "tensor" else 1)
    t_a = meas.atime_at(Bm / b, l) / L
    nbytes = meas.exchange_bytes_per_seq_layer() * Bm
    t_n = 2 * link.latency + nbytes / link.bandwidth
    bounds = {"model": m * L * t_m / (a if split == "replica" else 1), "attention": m * L * t_a,
              "network": m * L * nbytes / (min(a, b) * link.bandwidth), "chain": L * (t_m + t_n + t_a)}
    T = max(bounds.values())
    return {"a": a, "b": b, "microbatches": m, "batch": B, "context": l, "split": split, "step_s": T,
            "throughput_tok_s": B / T, "bound": max(bounds, key=bounds.get),
            "model_util": bounds["model"] / T, "attention_util": bounds["attention"] / T,
            "bytes_per_token": meas.exchange_bytes_per_seq_layer() * L,
            "bw_min_Bps": nbytes * m * L / (0.2 * (meas.mtime_at(B) + meas.atime_at(B, l))),
            **{f"{k}_s": v for k, v in bounds.items()}}


def predict_colocated(meas: Measurements, link: Link, D: int, B: int, l: int, kind: str) -> dict:
    """Step time and throughput of colocated decode on D devices: ``local`` replicas, ``tree``
    (replicated non-attention, KV split over the D), or ``tp`` (tensor parallel, the paper's vLLM
    baseline: heads and weights split, two all-reduces per layer, ideal scaling)."""
    L = meas.n_layers
    if kind == "local":
        T = meas.mtime_at(B / D) + meas.atime_at(B / D, l)
    elif kind == "tree":
        T = meas.mtime_at(B) + meas.atime_at(B, l / D) + (L * 2 * link.latency if D > 1 else 0.0)
    elif kind == "tp":
        T = (meas.mtime_at(B) + meas.atime_at(B, l)) / D + (L * 2 * 2 * link.latency if D > 1 else 0.0)
    else:
        raise ValueError(f"colocated kind must be one of {COLOCATED}, got {kind!r}")
    return {"kind": kind, "devices": D, "batch": B, "context": l, "step_s": T, "throughput_tok_s": B / T}


def max_batch(meas: Measurements, l: int, mem_model: float, mem_attention: float, a: int, b: int,
              split: str = "replica") -> dict:
    """The largest batch the KV memory allows: Lamina (KV only on the b attention devices of
    ``mem_attention`` bytes; 0 when the weights do not fit the model devices of ``mem_model``) and
    colocated on a + b devices of ``mem_model`` (local / tree: full weights on each; tp: W/D each)."""
    kv = meas.kv_bytes_per_seq(l)
    W = meas.weight_bytes
    D = a + b
    w_model = W / a if split == "tensor" else W
    free = mem_model - W
    return {"lamina": int(b * mem_attention // kv) if w_model <= mem_model else 0,
            "local": int(D * (free // kv)) if free > 0 else 0,
            "tree": int(D * free // kv) if free > 0 else 0,
            "tp": int((D * mem_model - W) // kv) if D * mem_model > W else 0,
            "kv_bytes_per_seq": kv, "weight_bytes": W}


def _best_lamina(meas, link, a, b, micro, B, l, split) -> dict:
    return min((predict_lamina(meas, link, a, b, m, B, l, split) for m in micro if m <= B),
               key=lambda r: r["step_s"])


def projection_table(meas: Measurements, link: Link, dops: list[tuple[int, int]], micro: list[int],
                     batches: list[int], l: int, mem_model: float | None = None,
                     mem_attention: float | None = None, split: str = "replica") -> list[dict]:
    """One row per (DOP, batch): Lamina at its best micro-batch count against colocated local,
    tree and tp decode on a + b devices (``vs_colocated``: Lamina over the best colocated
    throughput); with memory sizes, infeasible batches are marked, and a last row per DOP puts
    every config at its own memory-max batch (the paper's comparison: larger batches)."""
    rows = []
    for a, b in dops:
        D = a + b
        caps = max_batch(meas, l, mem_model, mem_attention, a, b, split) if mem_model and mem_attention else None
        points = [(B, {k: B for k in ("lamina",) + COLOCATED}) for B in batches]
        if caps:
            points.append(("memory max", {k: caps[k] for k in ("lamina",) + COLOCATED}))
        for label, bs in points:
            row = {"dop": f"({a}, {b})", "batch": label, "context": l}
            fits = (lambda k: caps is None or 0 < bs[k] <= caps[k])  # noqa: E731
            if fits("lamina"):
                lam = _best_lamina(meas, link, a, b, micro, bs["lamina"], l, split)
                row |= {"lamina_batch": bs["lamina"], "lamina_microbatches": lam["microbatches"],
                        "lamina_step_ms": lam["step_s"] * 1e3, "lamina_tok_s": lam["throughput_tok_s"],
                        "lamina_bound": lam["bound"]}
            else:
                row |= {"lamina_tok_s": 0.0, "lamina_bound": "does not fit"}
            colo = {}
            for k in COLOCATED:
                colo[k] = predict_colocated(meas, link, D, bs[k], l, k)["throughput_tok_s"] if fits(k) else 0.0
                row[f"{k}_tok_s"] = colo[k]
                if label == "memory max":
                    row[f"{k}_batch"] = bs[k]
            best = max(colo.values())
            row["vs_colocated"] = row["lamina_tok_s"] / best if best > 0 else float("inf")
            row["extrapolated"] = max(bs.values()) > max(meas.mtime)     # beyond the measured batches
            rows.append(row)
    return rows


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
    import torch

    from hpcattn.timing import timed_runs

    with torch.inference_mode():
        ts = timed_runs(fn, device, repeats)[1]
    return float(np.min(ts) if stat == "min" else np.median(ts))


def measure_mtime(model, B: int, repeats: int = 5, n_layers: int | None = None, stat: str = "median") -> float:
    """MTIME(B): seconds of the non-attention work of one decode step at batch B - per layer the
    norm, q/k/v projections + RoPE, output projection, residual and FFN (the Lamina model slice's
    ops), plus embedding, final norm, head and argmax - scaled from the model's layers to
    ``n_layers`` (default: as many as it has)."""
    import torch

    from hpcattn.model.lamina import finish_layer, project_kv, project_q

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
            project_q(model, i, h, cos, sin)
            project_kv(model, i, h, cos, sin)
            x = finish_layer(model, i, x, o)
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
    import torch

    from hpcattn.kernels import empty_head_major
    from hpcattn.model.lamina import append_new_token, fold_new_token

    torch.manual_seed(0)                               # values only matter for finiteness
    q = torch.randn(B, 1, n_heads, head_dim, device=device, dtype=dtype)
    cache = empty_head_major(B, l + 1, n_kv_heads, head_dim, dtype=dtype, device=device, lead=(2,)).normal_()
    kc, vc = cache[0, :, :l], cache[1, :, :l]          # (B, l, Hkv, d) head-major views: the prefix
    kv = torch.randn(2, B, 1, n_kv_heads, head_dim, device=device, dtype=dtype)
    scale, G = head_dim ** -0.5, n_heads // n_kv_heads
    buf, slots = cache.transpose(-3, -2), [l] * B      # (2, B, Hkv, l + 1, d): the new token's slot l

    def one():
        o, lse = kernel(q, kc, vc, scale=scale)
        out = fold_new_token(q, kv, o, lse, scale, G)
        append_new_token(buf, kv, range(B), slots)
        return out

    return _timed(one, torch.device(device), repeats, stat) * n_layers


def graph_blocker(device, dtype, head_dim: int) -> str | None:
    """Why the graph-captured timings cannot run on ``device`` (None: they can): they need CUDA
    and the Lean kernel (device lengths)."""
    from hpcattn.graph import lean_for_graphs

    if device.type != "cuda":
        return "CUDA graphs need a CUDA device (CPU: graph-captured timings skipped, eager only)"
    return lean_for_graphs(device, dtype, head_dim)[1]


def measure_mtime_graph(model, B: int, repeats: int = 5, n_layers: int | None = None,
                        stat: str = "median") -> float:
    """MTIME(B) with the model rank's step captured in one CUDA graph (CUDA only): seconds of one
    replay of :meth:`hpcattn.model.lamina.steps.ModelRole.step` - embedding, every layer's fused
    pre-attention (norm, q/k/v, RoPE, into send buffers) and post-attention (o proj + residual,
    norm, FFN, from the receive buffer), final norm, head, argmax; no attention. Layers beyond the
    model's are scaled as in :func:`measure_mtime` (the head timed alone, also captured)."""
    import torch

    from hpcattn.graph import StepGraph
    from hpcattn.model.lamina import ModelRole

    a = model.args
    dev = model.tok_embeddings.weight.device
    with torch.inference_mode():
        role = ModelRole(model, B, pos=100)
        role.token.random_(0, a.vocab_size)
        role.hidden.normal_()
        step = StepGraph(lambda: role.step(advance=False))
        t_step = _timed(step, dev, repeats, stat)
        if (n_layers or a.n_layers) == a.n_layers:
            return t_step
        t_head = _timed(StepGraph(role.head_step), dev, repeats, stat)
    return (t_step - t_head) * n_layers / a.n_layers + t_head


def measure_atime_graph(kernel, B: int, l: int, n_heads: int, n_kv_heads: int, head_dim: int, dtype, device,
                        n_layers: int, repeats: int = 5, stat: str = "median", min_bytes: int = 256 << 20) -> float:
    """ATIME(B, l) with the attention rank's step captured in one CUDA graph (CUDA only;
    ``kernel``: Lean, device lengths): per layer the kernel over an l-token head-major cache, the
    new token's LSE fold and the append of its k, v
    (:meth:`hpcattn.model.lamina.steps.AttentionRole.step`). As many layers as make ``min_bytes``
    of KV (at most ``n_layers``; a repeated small cache would be read from L2) are captured and
    the replay scaled to ``n_layers``."""
    import torch

    from hpcattn.graph import StepGraph
    from hpcattn.model.lamina import AttentionRole
    from hpcattn.model.kv_cache import ShardedKVCache

    per_layer = 2 * B * l * n_kv_heads * head_dim * torch.empty(0, dtype=dtype).element_size()
    n = max(1, min(n_layers, -(-min_bytes // per_layer)))
    with torch.inference_mode():
        cache = ShardedKVCache(n, B, n_kv_heads, head_dim, l + 1, dtype, device)
        cache.buf.normal_()
        cache.length = l
        role = AttentionRole(kernel, cache, n_heads)
        role.q.normal_()
        role.kv.normal_()
        t = _timed(StepGraph(lambda: role.step(advance=False)), torch.device(device), repeats, stat)
    return t * n_layers / n


def measure_colocated(model, kernel, B: int, l: int, graphs: bool, repeats: int = 5,
                      stat: str = "median") -> float:
    """Seconds of one colocated decode step of ``model`` (all its layers) at batch B over an
    l-token cache, as :class:`hpcattn.model.runner.ModelRunner` runs it on one device: eager
    (``graphs`` False: the plain model, ``kernel``) or captured (``graphs``: the runner's graph
    path, fused forward + Lean with device lengths; CUDA only). The cache grows by one token per
    step, as in a generation."""
    import torch

    from hpcattn.model.runner import ModelRunner

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


def add_parser(sub) -> None:
    """The ``lamina-cost`` subcommand's arguments (called by :mod:`hpcattn.cli`)."""
    p = sub.add_parser("lamina-cost", help="project Lamina decode (a model + b attention devices, m micro-batches) "
                                           "against colocated decode from measured MTIME/ATIME")
    p.add_argument("measurements", help="JSON written by benchmarks/lamina_measure.py")
    p.add_argument("--shape", help="which shape of a benchmark file (default: its first, the 8B shape)")
    p.add_argument("--dop", action="append", default=[], metavar="A,B",
                   help="model and attention device counts (repeatable; default 1,1 2,2 1,2 2,4)")
    p.add_argument("--microbatches", default="1,2,4,8", help="micro-batch counts to try (best is reported)")
    p.add_argument("--batch", default="16,64,256", help="batch sizes")
    p.add_argument("--context", type=int, default=8192, help="tokens per sequence (l)")
    p.add_argument("--link-gbps", type=float, default=50.0, help="link bandwidth GB/s (check-comm)")
    p.add_argument("--latency-us", type=float, default=33.3, help="one-way latency us (check-comm; NCCL "
                                                                  "RTT 66.6 us in the paper)")
    p.add_argument("--mem-gib-model", type=float, help="memory of a model device (GiB): adds the memory-max batch rows")
    p.add_argument("--mem-gib-attention", type=float, help="memory of an attention device (GiB)")
    p.add_argument("--model-split", default="replica", choices=SPLITS,
                   help="model devices as full-weight replicas (hpcattn) or one tensor-parallel group (the paper's 70B)")
    p.add_argument("-o", "--output", help="write rows + inputs as JSON")


def measure_link(ctx, peer: int, sizes: list[int], repeats: int = 20) -> dict[int, float]:
    """Ping-pong between this rank and ``peer`` through ``ctx.world`` isend/irecv (call on both):
    {bytes: one-way seconds}, half the median round trip timed on the lower of the two ranks and
    handed to the other, so both return the same figures.

    The timer of a round trip stops only after ``ctx.sync()``: over NCCL, ``isend`` / ``irecv`` and
    their ``wait()`` only enqueue the transfer and order the current stream after it, and the bytes
    move later on the device; the device sync waits for them (host-staged MPI's ``wait`` already
    blocks until the message is in place). The two ranks start each size together (a barrier)
    and discard two warm-up round trips (NCCL sets up a rank pair's channels on first use)."""
    import torch

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


def link_from_pingpong(times: dict[int, float]) -> Link:
    """Latency = the smallest message's one-way time; bandwidth from the largest message."""
    small, large = min(times), max(times)
    lat = times[small]
    bw = (large - small) / max(times[large] - lat, 1e-9)
    return Link(bandwidth=bw, latency=lat)

