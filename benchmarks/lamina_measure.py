"""Measure Lamina's cost-model inputs on ONE device and project disaggregated decode.

    python benchmarks/lamina_measure.py -o runs/lamina_h200.json --md runs/lamina_h200.md   # GPU
    python benchmarks/lamina_measure.py --smoke                                              # CPU, tiny shapes

What it measures (random weights, timings median of --reps after a warm-up, device-synchronised):

1. the Llama-3.1-8B shape (configs/models/llama-3.1-8b.yaml; --layers of its 32 layers built and
   timed, scaled to 32): MTIME(B) - norms, q/k/v/o projections + RoPE, FFN, embedding, head and
   argmax of one decode step - and ATIME(B, l) - the attention kernel over an l-token head-major
   cache plus the new token's LSE fold, the attention rank's ops (hpcattn.jobs.lamina_cost);
2. one LLaMA3-70B-shape layer (dim 8192, 64/8 heads, FFN 28672, vocab 128256), scaled to 80 layers;
3. the host<->device link of this machine: pinned and pageable copies of the per-layer Lamina
   message ((2 + 2/G) * d * e * B bytes) and a 4-byte copy's latency.

Then the cost model (hpcattn.jobs.lamina_cost) projects 1+1, 2+2 and the paper's DOP settings
((1, 2) for LLaMA-33B, (2, 4) for LLaMA-65B / LLaMA3-70B) at batches 16..256 and the memory-max
batch, for three links: the measured host<->device copy, a 400 Gb/s NIC as the paper measured
NCCL (35.5 GB/s, RTT 66.6 us) and its FHBN (45.7 GB/s, RTT 33.0 us). Both roles use this device's
measured times (the paper pairs H100 model devices with H20 attention devices; memory defaults
to theirs: 80 and 96 GiB). The 70B projection uses a tensor-parallel model group (its weights do
not fit one 80 GiB device); the 8B one full-weight replicas, as hpcattn runs them.

Output: JSON (-o) with every measurement and projection row, markdown (--md and stdout).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hpcattn.jobs.lamina_cost import Link, markdown, measure, projection_table  # noqa: E402
from hpcattn.kernels import select_kernel  # noqa: E402
from hpcattn.model.llama import ModelArgs, Transformer, rope_inv_freq  # noqa: E402

LLAMA3_70B = dict(vocab_size=128256, dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, head_dim=128,
                  ffn_dim=28672, norm_eps=1e-5, rope_theta=500000.0,
                  rope_scaling={"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                "original_max_position_embeddings": 8192})
PAPER_DOPS = [(1, 1), (2, 2), (1, 2), (2, 4)]
LINKS = {"paper NCCL 400Gb RoCE": Link(35.5e9, 33.3e-6), "paper FHBN 400Gb RoCE": Link(45.7e9, 16.5e-6)}


def random_on_device(args: ModelArgs, dtype, device) -> Transformer:
    """Random weights initialised on the device itself (timing only: values do not matter, and a
    70B-shape layer's CPU initialisation would take minutes)."""
    with torch.device("meta"):
        model = Transformer(args)
    model = model.to_empty(device=device)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.fill_(1.0) if name.endswith("norm.weight") else p.normal_(0.0, 0.02)
    model.inv_freq = rope_inv_freq(args).to(device)
    return model.to(dtype).eval()


def link_rows(device, dtype, d: int, G: int, batches: list[int], reps: int) -> tuple[list[dict], Link | None]:
    """Host<->device copies of the per-layer Lamina message of B sequences; the Link they imply."""
    if device.type != "cuda":
        return [], None
    e = torch.empty(0, dtype=dtype).element_size()
    rows = []

    def timed(fn):
        fn()
        torch.cuda.synchronize(device)
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            torch.cuda.synchronize(device)
            ts.append(time.perf_counter() - t0)
        return sorted(ts)[len(ts) // 2]

    for B in [0] + batches:
        n = max(int((2 + 2 / G) * d * e * B), 4)
        dev = torch.empty(n, dtype=torch.uint8, device=device)
        for pinned in (True, False):
            host = torch.empty(n, dtype=torch.uint8, pin_memory=pinned)
            h2d = timed(lambda: dev.copy_(host, non_blocking=pinned))
            d2h = timed(lambda: host.copy_(dev, non_blocking=pinned))
            rows.append({"batch": B, "bytes": n, "pinned": pinned, "h2d_us": h2d * 1e6, "d2h_us": d2h * 1e6,
                         "h2d_GBps": n / h2d / 1e9, "d2h_GBps": n / d2h / 1e9})
    pinned = [r for r in rows if r["pinned"]]
    lat = min(r["h2d_us"] for r in pinned) * 1e-6
    big = max(pinned, key=lambda r: r["bytes"])
    bw = big["bytes"] / max(big["h2d_us"] * 1e-6 - lat, 1e-9)
    return rows, Link(bw, lat)


def run_shape(name, args: ModelArgs, n_layers: int, layers: int, batches, contexts, device, dtype, reps,
              kv_budget: float) -> dict:
    """Build ``layers`` layers of ``args``, measure MTIME / ATIME scaled to ``n_layers``."""
    a = ModelArgs(**{**args.__dict__, "n_layers": layers})
    model = random_on_device(a, dtype, device)
    kern = select_kernel("auto", device, dtype, a.head_dim)
    e = torch.empty(0, dtype=dtype).element_size()
    t0 = time.time()
    meas = measure(model, kern, batches, [], reps, n_layers=n_layers, device_name=_device_name(device),
                   note=f"{name}: {layers} of {n_layers} layers timed, scaled; kernel {kern.name}")
    from hpcattn.jobs.lamina_cost import measure_atime
    for B in batches:
        for l in contexts:
            if 2 * B * l * a.n_kv_heads * a.head_dim * e > kv_budget:
                continue                                     # one layer's KV would not fit the budget
            meas.atime.append((B, l, measure_atime(kern, B, l, a.n_heads, a.n_kv_heads, a.head_dim, dtype, device,
                                                   n_layers, reps)))
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"name": name, "measurements": meas, "kernel": kern.name, "seconds": time.time() - t0}


def _device_name(device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny shapes on CPU (seconds; what the tests run)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--layers", type=int, default=2, help="8B layers built and timed")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--context", type=int, default=8192, help="context l of the projections")
    p.add_argument("--mem-gib-model", type=float, default=80.0, help="model device memory (paper: H100 80 GB)")
    p.add_argument("--mem-gib-attention", type=float, default=96.0, help="attention device memory (paper: H20 96 GB)")
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
        projection_contexts = [256]
        args.mem_gib_model, args.mem_gib_attention = 0.01, 0.012       # tiny devices for tiny models
    else:
        shapes = [("llama-3.1-8b", ModelArgs.from_preset("llama-3.1-8b"), 32, args.layers),
                  ("llama3-70b layer", ModelArgs(**LLAMA3_70B), 80, 1)]
        batches, contexts, reps = [1, 8, 16, 32, 64, 128, 256], [1024, 4096, 16384], args.reps
        kv_budget = 24 * (1 << 30)
        projection_contexts = [4096, args.context]
    results = [run_shape(name, a, L, layers, batches, contexts, device, dtype, reps, kv_budget)
               for name, a, L, layers in shapes]
    m0 = results[0]["measurements"]
    link_tab, link = link_rows(device, dtype, m0.n_heads * m0.head_dim, m0.n_heads // m0.n_kv_heads,
                               [16, 64, 256], reps)
    links = dict(LINKS)
    if link is not None:
        links["measured host<->device (pinned)"] = link
    gib = 1 << 30
    out = {"device": _device_name(device), "dtype": str(dtype).replace("torch.", ""), "torch": torch.__version__,
           "shapes": [], "link": link_tab, "links": {k: {"bandwidth": v.bandwidth, "latency": v.latency}
                                                      for k, v in links.items()}}
    md = [f"# Lamina projections from {out['device']} ({out['dtype']}, torch {torch.__version__})", ""]
    if link_tab:
        md += ["## Host<->device copies of one layer's Lamina message", "", markdown(link_tab), ""]
    for res in results:
        meas = res["measurements"]
        split = "tensor" if "70b" in res["name"] else "replica"
        entry = {"name": res["name"], "kernel": res["kernel"], "measurements": meas.to_json(), "split": split,
                 "projections": []}
        md += [f"## {res['name']} ({meas.note})", "",
               "MTIME(B) ms: " + ", ".join(f"{B}: {t * 1e3:.3g}" for B, t in sorted(meas.mtime.items())), "",
               "ATIME(B, l) ms: " + ", ".join(f"({B}, {l}): {t * 1e3:.3g}" for B, l, t in meas.atime), ""]
        for lname, lk in links.items():
            for l in projection_contexts:
                rows = projection_table(meas, lk, PAPER_DOPS, [1, 2, 4, 8], [16, 64, 256], l,
                                        args.mem_gib_model * gib, args.mem_gib_attention * gib, split)
                entry["projections"].append({"link": lname, "context": l, "rows": rows})
                md += [f"### link: {lname}; context {l}; model devices: {split}", "", markdown(rows), ""]
        out["shapes"].append(entry)
    text = "\n".join(md)
    print(text)
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(out, indent=1))
        print(f"wrote {args.output}")
    if args.md:
        Path(args.md).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
