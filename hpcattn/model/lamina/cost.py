"""Lamina cost model (spec lamina.md sections 4, 5.4, 6): step time, throughput and the batch the
memory allows, for a model ranks + b attention ranks with m micro-batches, against colocated
decode (``local`` replicas or ``tree``) on the same number of devices.

Inputs are measurements (:class:`Measurements`, written by ``benchmarks/lamina_measure.py`` or by
:func:`hpcattn.jobs.lamina_cost.measure`): MTIME(B), the non-attention time of one decode step (every layer's norms,
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

What it leaves out: activation memory, TP communication volume, kernel-launch and scheduling
overheads beyond the measured per-message latency, and contention between the overlapped phases.

Pure arithmetic on plain arguments: no config, no files, no device. The measurements, the link
probe and the ``hpcattn lamina-cost`` command are :mod:`hpcattn.jobs.lamina_cost`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

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


def link_from_pingpong(times: dict[int, float]) -> Link:
    """Latency = the smallest message's one-way time; bandwidth from the largest message."""
    small, large = min(times), max(times)
    lat = times[small]
    bw = (large - small) / max(times[large] - lat, 1e-9)
    return Link(bandwidth=bw, latency=lat)

