"""Measure Lamina's cost-model inputs on ONE device, eager and graph-captured, and project decode.

    PYTHONPATH=. python3 benchmarks/lamina_measure.py -o runs/lamina_h200.json --md runs/lamina_h200.md  # GPU, ~1-2 min
    python benchmarks/lamina_measure.py --smoke                                              # CPU, tiny shapes

Every timing is taken twice (random weights; median of --reps after a warm-up, device-synchronised):

* **eager**: the ops as hpcattn's Lamina path runs them today (:mod:`hpcattn.model.lamina`, one
  host launch per op; on a GPU these times are host-launch bound);
* **graph**: the same role's work between two exchanges captured in one CUDA graph and replayed
  (:mod:`hpcattn.model.lamina.steps`: the fused decode forward of :mod:`hpcattn.model.fused_decode`,
  Lean with device lengths): what a graph-captured Lamina would get. CUDA only; on CPU (--smoke)
  skipped with a note.

What it measures:

1. the Llama-3.1-8B shape (configs/models/llama-3.1-8b.yaml; --layers of its 32 layers built,
   default all): MTIME(B) - the model rank's step: embedding, per layer norm, q/k/v + RoPE, o proj
   + residual, norm, FFN, then final norm, head, argmax - and ATIME(B, l) - the attention rank's
   step: per layer the kernel over an l-token head-major cache, the new token's LSE fold and (graph)
   the append; and, measured the same two ways, the colocated decode step of the model runner
   (:class:`hpcattn.model.runner.ModelRunner`; eager: plain model + kernel auto; graph: its captured
   step) at a few (B, l), next to MTIME(B) + ATIME(B, l);
2. one LLaMA3-70B-shape layer (dim 8192, 64/8 heads, FFN 28672, vocab 128256), scaled to 80 layers;
3. the host<->device link of this machine: pinned and pageable copies of the per-layer Lamina
   message ((2 + 2/G) * d * e * B bytes) and a 4-byte copy's latency (buffers touched, 5 warm-up
   copies per size; wall time and CUDA-event time).

Then the cost model (hpcattn.model.lamina.cost) projects 1+1, 2+2 and the paper's DOP settings
((1, 2) for LLaMA-33B, (2, 4) for LLaMA-65B / LLaMA3-70B) at batches 16..256 and the memory-max
batch, for three links: the measured host<->device copy, a 400 Gb/s NIC as the paper measured
NCCL (35.5 GB/s, RTT 66.6 us) and its FHBN (45.7 GB/s, RTT 33.0 us) - once from the eager and once
from the graph timings, each against colocated decode predicted from the same timings (eager
Lamina vs eager colocated, graph vs graph). Both roles use this device's times (the paper pairs
H100 model devices with H20 attention devices; memory defaults to theirs: 80 and 96 GiB). The 70B
projection uses a tensor-parallel model group (its weights do not fit one 80 GiB device); the 8B
one full-weight replicas, as hpcattn runs them.

Robustness: every timing is guarded (a failure is printed and recorded, the rest runs on); after
--max-seconds the remaining graph and colocated timings are skipped (noted); progress lines are
flushed; the JSON (-o) is rewritten after every shape (``complete: false`` until the end).
Output: JSON (-o) with every measurement and projection row, markdown (--md and stdout).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hpcattn.jobs import lamina_cost as lc  # noqa: E402
from hpcattn.jobs.lamina_cost import markdown  # noqa: E402
from hpcattn.model.lamina.cost import COLOCATED, Link, projection_table  # noqa: E402
from hpcattn.kernels import select_kernel  # noqa: E402
from hpcattn.model.llama import ModelArgs  # noqa: E402
from hpcattn.model.weights import random_model_on_device  # noqa: E402

LLAMA3_70B = dict(vocab_size=128256, dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, head_dim=128,
                  ffn_dim=28672, norm_eps=1e-5, rope_theta=500000.0,
                  rope_scaling={"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                "original_max_position_embeddings": 8192})
PAPER_DOPS = [(1, 1), (2, 2), (1, 2), (2, 4)]
LINKS = {"paper NCCL 400Gb RoCE": Link(35.5e9, 33.3e-6), "paper FHBN 400Gb RoCE": Link(45.7e9, 16.5e-6)}
TIMINGS = ("eager", "graph")
T0 = time.time()


def log(msg: str) -> None:
    print(f"[{time.time() - T0:6.1f} s] {msg}", flush=True)


class Guard:
    """Runs timings so that one failure cannot end the run; past the deadline, optional timings
    are skipped. ``notes``: what failed or was skipped (into the JSON and the markdown)."""

    def __init__(self, deadline_s: float, device):
        self.deadline, self.device = T0 + deadline_s, device
        self.notes: list[str] = []
        self.broken = False                  # the device context is unusable: run nothing more on it

    def __call__(self, label: str, fn, optional: bool = False):
        if self.broken:
            return None
        if optional and time.time() > self.deadline:
            self._note(f"{label}: skipped (past --max-seconds)")
            return None
        t0 = time.time()
        try:
            value = fn()
        except Exception as e:                                         # noqa: BLE001 - recorded
            self._note(f"{label}: FAILED {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            self._recover()
            return None
        finally:
            gc.collect()
            if self.device.type == "cuda" and not self.broken:
                try:
                    torch.cuda.empty_cache()
                except Exception as e:                                 # noqa: BLE001
                    self.broken = True
                    self._note(f"device unusable after {label} ({type(e).__name__}): remaining timings skipped")
        shown = f"{value * 1e3:.3f} ms" if isinstance(value, float) else "done"
        log(f"{label}: {shown} ({time.time() - t0:.1f} s)")
        return value

    def _note(self, text: str) -> None:
        self.notes.append(text)
        log(text)

    def _recover(self) -> None:
        if self.device.type != "cuda":
            return
        try:
            torch.cuda.synchronize(self.device)
        except Exception as e:                                         # noqa: BLE001
            self.broken = True
            self._note(f"device unusable after the failure ({type(e).__name__}): remaining timings skipped")


def link_rows(device, dtype, d: int, G: int, batches: list[int], reps: int) -> tuple[list[dict], Link | None]:
    """Host<->device copies of the per-layer Lamina message of B sequences; the Link they imply.
    Buffers are allocated and touched first, each copy is warmed up 5 times; wall (host, synced:
    what a staged transfer costs) and CUDA-event (the copy on the stream) medians."""
    if device.type != "cuda":
        return [], None
    e = torch.empty(0, dtype=dtype).element_size()
    sizes = [(B, max(int((2 + 2 / G) * d * e * B), 4)) for B in [0] + batches]
    bufs = {}
    for B, n in sizes:
        dev = torch.ones(n, dtype=torch.uint8, device=device)
        for pinned in (True, False):
            bufs[(B, pinned)] = (dev, torch.ones(n, dtype=torch.uint8, pin_memory=pinned))
    torch.cuda.synchronize(device)

    def timed(fn):
        for _ in range(5):
            fn()
        torch.cuda.synchronize(device)
        wall, ev = [], []
        for _ in range(reps):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            t0 = time.perf_counter()
            a.record()
            fn()
            b.record()
            b.synchronize()
            wall.append(time.perf_counter() - t0)
            ev.append(a.elapsed_time(b) * 1e-3)
        return sorted(wall)[len(wall) // 2], sorted(ev)[len(ev) // 2]

    rows = []
    for B, n in sizes:
        for pinned in (True, False):
            dev, host = bufs[(B, pinned)]
            h2d, h2d_ev = timed(lambda: dev.copy_(host, non_blocking=pinned))
            d2h, d2h_ev = timed(lambda: host.copy_(dev, non_blocking=pinned))
            rows.append({"batch": B, "bytes": n, "pinned": pinned, "h2d_us": h2d * 1e6, "d2h_us": d2h * 1e6,
                         "h2d_event_us": h2d_ev * 1e6, "d2h_event_us": d2h_ev * 1e6,
                         "h2d_GBps": n / h2d / 1e9, "d2h_GBps": n / d2h / 1e9})
    pinned = [r for r in rows if r["pinned"]]
    lat = min(r["h2d_us"] for r in pinned) * 1e-6
    big = max(pinned, key=lambda r: r["bytes"])
    bw = big["bytes"] / max(big["h2d_us"] * 1e-6 - lat, 1e-9)
    return rows, Link(bw, lat)


def run_shape(name, args: ModelArgs, n_layers: int, layers: int, batches, contexts, device, dtype, reps,
              kv_budget: float, graph_reason: str | None, colocated: list[tuple[int, int]], guard: Guard,
              l2_bytes: int = 256 << 20) -> dict:
    """Build ``layers`` layers of ``args``; eager and graph MTIME / ATIME scaled to ``n_layers``
    (graph ATIME: as many layer caches as make ``l2_bytes``, so that no cache is read from L2);
    the colocated step of the built model at the ``colocated`` (B, l) points (next to MTIME +
    ATIME when all layers are built)."""
    a = ModelArgs(**{**args.__dict__, "n_layers": layers})
    t0 = time.time()
    log(f"{name}: building {layers} of {n_layers} layers on {device}")
    model = random_model_on_device(a, dtype, device)
    kern = select_kernel("auto", device, dtype, a.head_dim)
    lean = select_kernel("lean", device, dtype, a.head_dim) if graph_reason is None else None
    e = torch.empty(0, dtype=dtype).element_size()
    scaled = f"{layers} of {n_layers} layers timed, scaled" if layers != n_layers else f"all {n_layers} layers"
    base = lc.measure(model, kern, [], [], n_layers=n_layers, device_name=_device_name(device))
    meas = {"eager": dataclasses.replace(base, note=f"{name}: eager (hpcattn's Lamina path today: one launch "
                                                    f"per op), {scaled}; kernel {kern.name}"),
            "graph": dataclasses.replace(base, mtime={}, atime=[],
                                         note=f"{name}: graph-captured role steps (fused forward, Lean with "
                                              f"device lengths), {scaled}")}
    points = [(B, l) for B in batches for l in contexts
              if 2 * B * l * a.n_kv_heads * a.head_dim * e <= kv_budget]  # one layer's KV within the budget
    timings = TIMINGS if graph_reason is None else ("eager",)
    for timing in timings:
        g = timing == "graph"
        for B in batches:
            fn = ((lambda B=B: lc.measure_mtime_graph(model, B, reps, n_layers)) if g else
                  (lambda B=B: lc.measure_mtime(model, B, reps, n_layers)))
            t = guard(f"{name} MTIME({B}) {timing}", fn, optional=g)
            if t is not None:
                meas[timing].mtime[B] = t
        for B, l in points:
            k = lean if g else kern
            fn = ((lambda B=B, l=l, k=k: lc.measure_atime_graph(k, B, l, a.n_heads, a.n_kv_heads, a.head_dim, dtype,
                                                                 device, n_layers, reps, min_bytes=l2_bytes)) if g else
                  (lambda B=B, l=l, k=k: lc.measure_atime(k, B, l, a.n_heads, a.n_kv_heads, a.head_dim, dtype,
                                                           device, n_layers, reps)))
            t = guard(f"{name} ATIME({B}, {l}) {timing}", fn, optional=g)
            if t is not None:
                meas[timing].atime.append((B, l, t))
    colo = []
    for B, l in colocated:                     # MTIME + ATIME next to it only when all layers are built
        row = {"batch": B, "context": l}
        for timing in timings:
            g = timing == "graph"
            t = guard(f"{name} colocated step B={B} l={l} {timing}",
                      lambda B=B, l=l, g=g: lc.measure_colocated(model, lean if g else kern, B, l, g, reps),
                      optional=True)
            m = meas[timing]
            row[f"{timing}_ms"] = t * 1e3 if t is not None else None
            row[f"{timing}_mtime_plus_atime_ms"] = ((m.mtime_at(B) + m.atime_at(B, l)) * 1e3
                                                    if m.mtime and m.atime and layers == n_layers else None)
        colo.append(row)
    del model
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    log(f"{name}: done in {time.time() - t0:.1f} s")
    return {"name": name, "measurements": meas, "timings": timings, "kernel": kern.name, "colocated": colo,
            "seconds": time.time() - t0}


def _device_name(device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def _ms(x) -> str:
    return "-" if x is None else f"{x * 1e3:.3g}"


def measurement_md(res: dict) -> list[str]:
    """MTIME / ATIME eager and graph side by side, and the colocated step against MTIME + ATIME."""
    me, mg = res["measurements"]["eager"], res["measurements"]["graph"]
    md = [f"## {res['name']}: measurements (ms per decode step of {me.n_layers} layers)", "",
          f"- eager: {me.note}", f"- graph: {mg.note}" if "graph" in res["timings"] else "- graph: not measured", "",
          "| B | MTIME eager | MTIME graph |", "|---|---|---|"]
    md += [f"| {B} | {_ms(me.mtime.get(B))} | {_ms(mg.mtime.get(B))} |" for B in sorted(set(me.mtime) | set(mg.mtime))]
    ge = {(B, l): t for B, l, t in mg.atime}
    md += ["", "| B | l | ATIME eager | ATIME graph |", "|---|---|---|---|"]
    md += [f"| {B} | {l} | {_ms(t)} | {_ms(ge.get((B, l)))} |" for B, l, t in me.atime]
    if res["colocated"]:
        md += ["", "Colocated decode step (model runner, one device), measured, next to MTIME(B) + ATIME(B, l):", "",
               markdown(res["colocated"])]
    return md + [""]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny shapes on CPU (seconds; what the tests run)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--layers", type=int, default=32, help="8B layers built and timed (of 32; fewer are scaled)")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--full", action="store_true", help="batches 1, 8, 16, ..., 256 (default 1, 16, 64, 256)")
    p.add_argument("--batches", help="comma list: the batches B timed (overrides the default / --full set)")
    p.add_argument("--contexts", help="comma list: the contexts l of ATIME (default 1024,4096,16384)")
    p.add_argument("--context", type=int, default=8192, help="context l of the projections")
    p.add_argument("--max-seconds", type=float, default=90.0,
                   help="after this, remaining graph / colocated timings are skipped (noted)")
    p.add_argument("--mem-gib-model", type=float, default=80.0, help="model device memory (paper: H100 80 GB)")
    p.add_argument("--mem-gib-attention", type=float, default=96.0, help="attention device memory (paper: H20 96 GB)")
    p.add_argument("--only-8b", action="store_true", help="measure the Llama-3.1-8B shape only (no 70B layer)")
    p.add_argument("--no-scale", action="store_true",
                   help="report the --layers built as the model (no scaling to 32): to compare with a run of "
                        "model.layers=--layers")
    p.add_argument("--no-colocated", action="store_true", help="skip the colocated step timings")
    p.add_argument("-o", "--output", help="JSON file")
    p.add_argument("--md", help="markdown file")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    torch.set_grad_enabled(False)
    if args.smoke:
        device, dtype = torch.device("cpu"), torch.float32
        shapes = [("tiny (8B stand-in)", ModelArgs.from_preset("tiny"), 32, 2),
                  ("tiny-70b-like", ModelArgs(**{**LLAMA3_70B, "vocab_size": 512, "dim": 128, "n_heads": 16,
                                                 "n_kv_heads": 2, "head_dim": 8, "ffn_dim": 448}), 80, 1)]
        batches, contexts, reps, kv_budget = [1, 4, 8], [64, 256], 3, 1 << 28
        colocated = [(2, 64)]
        projection_contexts = [256]
        args.mem_gib_model, args.mem_gib_attention = 0.01, 0.012       # tiny devices for tiny models
    else:
        shapes = [("llama-3.1-8b", ModelArgs.from_preset("llama-3.1-8b"), 32, args.layers),
                  ("llama3-70b layer", ModelArgs(**LLAMA3_70B), 80, 1)]
        batches = [1, 8, 16, 32, 64, 128, 256] if args.full else [1, 16, 64, 256]
        contexts, reps = [1024, 4096, 16384], args.reps
        kv_budget = 24 * (1 << 30)
        colocated = [(1, 4096), (16, 4096), (64, 4096)]
        projection_contexts = sorted({4096, args.context})
    if args.only_8b:
        shapes = shapes[:1]
    if args.no_scale:
        shapes = [(name, a, layers, layers) for name, a, _, layers in shapes]
    if args.no_colocated:
        colocated = []
    try:
        batches = [int(x) for x in args.batches.split(",")] if args.batches else batches
        contexts = [int(x) for x in args.contexts.split(",")] if args.contexts else contexts
    except ValueError:
        p.error("--batches / --contexts: expected comma-separated integers")
    if min(batches + contexts) < 1:
        p.error("--batches / --contexts: expected positive integers")
    guard = Guard(args.max_seconds, device)
    graph_reason = lc.graph_blocker(device, dtype, shapes[0][1].head_dim)
    log(f"device {_device_name(device)}, {dtype}, torch {torch.__version__}; graph timings: "
        f"{'yes' if graph_reason is None else 'skipped: ' + graph_reason}")
    out = {"device": _device_name(device), "dtype": str(dtype).replace("torch.", ""), "torch": torch.__version__,
           "complete": False, "graph_timings": "measured" if graph_reason is None else f"skipped: {graph_reason}",
           "shapes": [], "link": [], "links": {}, "notes": guard.notes}

    def save():
        if args.output:
            Path(args.output).parent.mkdir(parents=True, exist_ok=True)
            Path(args.output).write_text(json.dumps(out, indent=1))

    m0 = shapes[0][1]
    link_tab, link = (guard("host<->device copies", lambda: link_rows(
        device, dtype, m0.n_heads * m0.head_dim, m0.n_heads // m0.n_kv_heads, [16, 64, 256], max(reps, 20)))
        if device.type == "cuda" else None) or ([], None)
    links = dict(LINKS)
    if link is not None:
        links["measured host<->device (pinned)"] = link
    out["link"] = link_tab
    out["links"] = {k: {"bandwidth": v.bandwidth, "latency": v.latency} for k, v in links.items()}
    results = []
    for name, a, L, layers in shapes:
        res = guard(f"{name}: all timings", lambda: run_shape(
            name, a, L, layers, batches, contexts, device, dtype, reps, kv_budget, graph_reason,
            colocated if name == shapes[0][0] else [], guard, l2_bytes=0 if args.smoke else 256 << 20))
        if res is not None:
            results.append(res)
        out["shapes"] = [{"name": r["name"] + ("" if t == "eager" else " (graph)"), "timing": t,
                          "measurements": r["measurements"][t].to_json()} for r in results for t in r["timings"]]
        save()
    gib = 1 << 30
    md = [f"# Lamina projections from {out['device']} ({out['dtype']}, torch {torch.__version__})", "",
          "Timings: **eager** = the ops as hpcattn's Lamina path runs them today (one host launch per op); "
          "**graph** = each role's work between exchanges captured in one CUDA graph (what a graph-captured "
          f"Lamina would get). Graph timings: {out['graph_timings']}. Every projection compares Lamina with "
          "colocated decode predicted from the same timings.", ""]
    if guard.notes:
        md += ["Notes:", ""] + [f"- {n}" for n in guard.notes] + [""]
    summary, tables = [], []
    out["shapes"] = []
    for res in results:
        split = "tensor" if "70b" in res["name"] else "replica"
        tables += measurement_md(res)
        for timing in res["timings"]:
            meas = res["measurements"][timing]
            name = res["name"] + ("" if timing == "eager" else " (graph)")
            entry = {"name": name, "timing": timing, "kernel": res["kernel"] if timing == "eager" else "lean",
                     "measurements": meas.to_json(), "split": split, "projections": [],
                     "colocated_measured": res["colocated"]}
            if not meas.mtime or not meas.atime:
                tables += [f"### {name}: no projections (missing MTIME or ATIME; see the notes)", ""]
                out["shapes"].append(entry)
                continue
            for lname, lk in links.items():
                for l in projection_contexts:
                    rows = projection_table(meas, lk, PAPER_DOPS, [1, 2, 4, 8], [16, 64, 256], l,
                                            args.mem_gib_model * gib, args.mem_gib_attention * gib, split)
                    entry["projections"].append({"link": lname, "context": l, "rows": rows})
                    tables += [f"### link: {lname}; context {l}; model devices: {split}; {timing} timings ({name})",
                               "", markdown(rows), ""]
                    if l == projection_contexts[-1]:
                        summary += [{"shape": res["name"], "timing": timing, "link": lname, "context": l,
                                     "dop": r["dop"], "lamina_batch": r.get("lamina_batch", 0),
                                     "lamina_tok_s": r["lamina_tok_s"], "lamina_bound": r["lamina_bound"],
                                     "best_colocated_tok_s": max(r[f"{k}_tok_s"] for k in COLOCATED),
                                     "vs_colocated": r["vs_colocated"]}
                                    for r in rows if r["batch"] == "memory max"]
            out["shapes"].append(entry)
    if summary:
        md += ["## Summary: every configuration at its memory-max batch", "", markdown(summary), ""]
    if link_tab:
        md += ["## Host<->device copies of one layer's Lamina message", "", markdown(link_tab), ""]
    md += tables
    out["summary"], out["complete"] = summary, True
    text = "\n".join(md)
    print(text, flush=True)
    save()
    if args.output:
        print(f"wrote {args.output}")
    if args.md:
        Path(args.md).write_text(text + "\n")
    log("finished")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
