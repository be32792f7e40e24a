"""Lamina captured vs eager, per role, against the cost model: reads the records of two ``hpcattn
run`` Lamina runs (``run.cuda_graphs=true`` and ``false``, same cases), the role times of
``benchmarks/lamina_measure.py`` on the same card and the link of ``benchmarks/lamina_link.py``.

    python benchmarks/lamina_graphs_report.py --graph runs/g.h5 --eager runs/e.h5 \\
        --measure runs/measure.json --link runs/link.json --md runs/lamina_graphs.md -o runs/lamina_graphs.json

``--graph``, ``--eager`` and ``--link`` may be given several times (one run and one link per
transport, e.g. host-staged and CUDA-aware MPI): each case is charged the link measured over its
record's transport.

Per case (batch B, micro-batches m; context l = the record's context): per role the median over
decode steps 1.. (step 0 holds the prompt-KV hand-over) and repeats of the step time, busy time
(computing, device-synchronised), the device time of its replayed pieces within busy (captured runs;
busy - pieces is the host's share: launches, syncs, sends), the time in send calls within busy (the
transport's work there) and wait time; the whole step (max over ranks); the cost model's
prediction (:func:`hpcattn.model.lamina.cost.predict_lamina`, DOP (1, 1), m micro-batches) from the
graph timings for the captured run and the eager timings for the eager run, with the measured
link; the issue's targets: model busy <= 1.2 x captured MTIME(B), attention busy <= 1.2 x captured
ATIME(B, l), captured step <= 1.25 x predicted. Timings of fewer layers than the measurement's are
compared with the measurement scaled by layers (head included: an approximation, noted).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hpcattn.jobs.lamina_cost import load_measurements  # noqa: E402
from hpcattn.model.lamina.cost import Link, Measurements, predict_lamina  # noqa: E402

SETS = ("decode_step_s", "lamina_busy_s", "lamina_wait_s", "lamina_piece_s", "lamina_send_s")


def role_medians(row: dict) -> dict:
    """Per role: median step / busy / wait / piece / send (ms) over decode steps >= 1 and repeats
    (piece: NaN for eager ranks); whole step."""
    roles = list(row["lamina_roles"])
    out = {}
    arrs = {k: np.asarray(row["datasets"][k][0], dtype=np.float64) for k in SETS}   # (T, steps, R)
    first = 1 if arrs["decode_step_s"].shape[1] > 1 else 0
    for role in ("model", "attention"):
        cols = [i for i, r in enumerate(roles) if r == role]
        for k, name in zip(SETS, ("step", "busy", "wait", "piece", "send")):
            v = arrs[k][:, first:, cols]
            out[f"{role}_{name}_ms"] = float(np.median(v)) * 1e3 if not np.isnan(v).all() else float("nan")
    out["step_ms"] = float(np.median(arrs["decode_step_s"][:, first:, :].max(axis=2))) * 1e3
    return out


def scaled(meas: Measurements, layers: int) -> Measurements:
    if layers == meas.n_layers:
        return meas
    f = layers / meas.n_layers
    return Measurements(layers, meas.dim, meas.n_heads, meas.n_kv_heads, meas.head_dim, meas.elem_bytes,
                        meas.weight_bytes, {b: t * f for b, t in meas.mtime.items()},
                        [(b, n, t * f) for b, n, t in meas.atime], meas.device,
                        meas.note + f" (scaled to {layers} layers)")


def main(argv=None) -> int:
    from hpcattn.results.hdf5 import read_cases

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--graph", action="append", required=True, help="record of a run with run.cuda_graphs=true")
    p.add_argument("--eager", action="append", default=[], help="record of a run with run.cuda_graphs=false")
    p.add_argument("--measure", required=True, help="benchmarks/lamina_measure.py JSON (same card)")
    p.add_argument("--shape", default="llama-3.1-8b", help="its shape name (graph timings: NAME (graph))")
    p.add_argument("--link", action="append", required=True,
                   help="benchmarks/lamina_link.py JSON (one per transport of the records)")
    p.add_argument("-o", "--output")
    p.add_argument("--md")
    args = p.parse_args(argv)
    lks = {lk["transport"]: lk for lk in (json.loads(Path(f).read_text()) for f in args.link)}
    links = {t: Link(lk["bandwidth"], lk["latency"]) for t, lk in lks.items()}
    meas = {"eager": load_measurements(args.measure, args.shape),
            "graph": load_measurements(args.measure, f"{args.shape} (graph)")}
    rows, notes = [], []
    for mode, path in [("graph", g) for g in args.graph] + [("eager", e) for e in args.eager]:
        meta, cases = read_cases(path, datasets=SETS)
        transport = str(meta.get("transport"))                # the run's (file attribute)
        if transport not in links:
            raise SystemExit(f"lamina_graphs_report: {path}: transport {transport!r} has no --link "
                             f"(links given: {sorted(links)})")
        link = links[transport]
        for c in cases:
            if "lamina_roles" not in c:
                continue
            B, l, m, L = int(c["batch"]), int(c["context"]), int(c["lamina_microbatches"]), int(c["n_layers"])
            ms = scaled(meas[mode], L)
            if L != meas[mode].n_layers:
                notes.append(f"{mode} B={B}: {L} layers run, measurements scaled from {meas[mode].n_layers} "
                             f"(head included)")
            pred = predict_lamina(ms, link, 1, 1, m, B, l)
            r = {"mode": mode, "transport": transport, "batch": B, "microbatches": m, "context": l, "layers": L,
                 "model_graphs": c.get("lamina_model_cuda_graphs"),
                 "attention_graphs": c.get("lamina_attention_cuda_graphs"),
                 **role_medians(c), "predicted_step_ms": pred["step_s"] * 1e3, "predicted_bound": pred["bound"],
                 "mtime_ms": ms.mtime_at(B / m) * 1e3, "atime_ms": ms.atime_at(B / m, l) * 1e3,
                 "check_passed": c.get("check_passed")}
            r["step_vs_predicted"] = r["step_ms"] / r["predicted_step_ms"]
            r["model_busy_vs_mtime"] = r["model_busy_ms"] / m / r["mtime_ms"]
            r["attention_busy_vs_atime"] = r["attention_busy_ms"] / m / r["atime_ms"]
            rows.append(r)
    rows.sort(key=lambda r: (r["batch"], r["microbatches"], r["transport"], r["mode"] != "graph"))
    head = ["B", "m", "transport", "mode (model/attn)", "step", "predicted", "x", "model step/busy/pieces/sends/wait", "MTIME",
            "busy/MTIME", "attn step/busy/pieces/sends/wait", "ATIME", "busy/ATIME", "check"]
    md = [f"# Lamina, 1 model + 1 attention rank ({next(iter(lks.values()))['device']}); times in ms (median over "
          "decode steps >= 1)", ""]
    md += [f"- link over {t}: {lk.latency * 1e6:.1f} us, {lk.bandwidth / 1e9:.2f} GB/s" for t, lk in links.items()]
    md += ["",
          "Targets (captured): model busy <= 1.2 x MTIME, attention busy <= 1.2 x ATIME, step <= 1.25 x predicted. "
          "MTIME / ATIME / predicted from the same mode's timings (graph: captured segments, eager: one launch per "
          "op); with m micro-batches the busy times cover m items per step and are divided by m. pieces: the "
          "device time of the replayed pieces within busy (CUDA events; captured runs only); sends: the time of "
          "the send calls within busy (the transport's work there).", "",
          "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        md.append(f"| {r['batch']} | {r['microbatches']} | {r['transport']} | {r['mode']} ({r['model_graphs']}/{r['attention_graphs']})"
                  f" | {r['step_ms']:.2f} | {r['predicted_step_ms']:.2f} ({r['predicted_bound']}) | "
                  f"{r['step_vs_predicted']:.2f} | "
                  f"{r['model_step_ms']:.2f} / {r['model_busy_ms']:.2f} / {r['model_piece_ms']:.2f} / {r['model_send_ms']:.2f} / "
                  f"{r['model_wait_ms']:.2f} | "
                  f"{r['mtime_ms']:.2f} | "
                  f"{r['model_busy_vs_mtime']:.2f} | {r['attention_step_ms']:.2f} / {r['attention_busy_ms']:.2f} / "
                  f"{r['attention_piece_ms']:.2f} / {r['attention_send_ms']:.2f} / {r['attention_wait_ms']:.2f} | {r['atime_ms']:.2f} | {r['attention_busy_vs_atime']:.2f} | "
                  f"{r['check_passed']} |")
    md += [""] + [f"- note: {n}" for n in sorted(set(notes))]
    text = "\n".join(md)
    print(text)
    if args.md:
        Path(args.md).write_text(text + "\n")
    if args.output:
        Path(args.output).write_text(json.dumps({"links": lks, "rows": rows, "notes": sorted(set(notes))}, indent=1))
    return 0


if __name__ == "__main__":
    from hpcattn.errors import HpcattnError

    try:
        raise SystemExit(main())
    except (HpcattnError, OSError) as e:          # a missing or unreadable input: one line
        raise SystemExit(f"lamina_graphs_report: {e}") from None
