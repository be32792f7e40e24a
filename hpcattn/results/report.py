"""Fixed-width (or CSV) tables of the cases in one or more HDF5 records.

One row per case: method, variant, shape, world size, median/p10/p90 step time (max over ranks),
communication share of the slowest rank, speedup against the ``local`` baseline of the same sweep
point in the same file, the ratio to that point's peer (``vs_peer``: PyTorch's ``torch_cp`` ring
for prefill, the KV-rotating ``ring`` for decode; peer time / case time), achieved throughput (decode: KV bytes read per second over all ranks;
prefill: attention FLOP/s, causal counted as half), the check's max error and verdict (``ok``,
``FAIL``, or ``-`` for no verdict: ``run.check`` off, or an approximate generate case), and the
record's status (``complete``; ``running``: a ``NAME.tmp`` of a run going on or killed;
``incomplete``: a killed run merged by ``hpcattn recover``).
"""

from __future__ import annotations

import csv
import io
import sys

from hpcattn.results.accuracy import format_accuracy_table
from hpcattn.results.hdf5 import ProjectionFile, read_cases

COLUMNS = [  # (header, width, key or function)
    ("file", 14), ("case", 30), ("method", 6), ("variant", 18), ("B", 3), ("N", 8), ("p", 3),
    ("dtype", 8), ("median_ms", 10), ("p10_ms", 9), ("p90_ms", 9), ("comm%", 6), ("speedup", 8),
    ("vs_peer", 8), ("rate", 12), ("err_out", 9), ("check", 5), ("status", 10),
]


def check_text(row: dict) -> str:
    """The verdict as printed: ``ok``, ``FAIL``, or ``-`` (no verdict: check_passed None or absent)."""
    return {True: "ok", False: "FAIL"}.get(row.get("check_passed"), "-")


def kv_bytes(row: dict) -> int:
    """Bytes of K and V a decode case reads once: 2 * sum(lengths) * heads_kv * head_dim * element size."""
    e = {"float64": 8, "float32": 4}.get(row["dtype"], 2)
    lengths = row.get("lengths") or [row["context"]] * row["batch"]
    return 2 * sum(lengths) * row["heads_kv"] * row["head_dim"] * e


def _rate(row: dict) -> str:
    t = row.get("time_median_s") or 0
    if t <= 0:
        return ""
    B, N, Hq, d = row["batch"], row["context"], row["heads_q"], row["head_dim"]
    if row["job"] in ("generate", "eval"):
        return f"{row['throughput_tok_s']:.4g} tok/s"
    if row["job"] == "decode":
        return _si(kv_bytes(row) / t, "B/s")
    flops = 4 * B * N * N * Hq * d * (0.5 if row.get("causal") else 1.0)
    return _si(flops / t, "F/s")


def _si(x: float, unit: str) -> str:
    for prefix, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6)):
        if x >= scale:
            return f"{x / scale:.3g} {prefix}{unit}"
    return f"{x:.3g} {unit}"


PEERS = {"prefill": "torch_cp", "decode": "ring"}   # the method each job's cases are compared with


def rows_from_files(paths: list[str]) -> list[dict]:
    """Case rows of every file (case attrs, plus the record's root attrs: status, transport,
    git_commit, ...), with the speedup against the same file's local baseline and the
    ratio to the same sweep point's peer (fastest peer case when it has several variants).
    A projection file (``hpcattn project -o``, e.g. among ``runs/*.h5``) is skipped with one
    warning line naming it; any other file that is not a record is an InputError."""
    out = []
    for path in paths:
        try:
            meta, rows = read_cases(path)
        except ProjectionFile as e:
            print(f"hpcattn: warning: {e}; skipped (its rows are the JSON in /rows_json: docs/hdf5.md)",
                  file=sys.stderr)
            continue
        base = {r["group"]: r["time_median_s"] for r in rows if r["method"] == "local"}
        peer: dict = {}
        for r in rows:
            if r["method"] == PEERS.get(r["job"]) and r.get("time_median_s"):
                peer[r["group"]] = min(peer.get(r["group"], float("inf")), r["time_median_s"])
        for r in rows:
            b, pt, t = base.get(r["group"]), peer.get(r["group"]), r.get("time_median_s")
            r["speedup"] = (b / t) if b and t else None
            r["vs_peer"] = (pt / t) if pt and t and r["method"] not in ("local", PEERS.get(r["job"])) else None
            for k, v in meta.items():      # run metadata (status, transport, git_commit, ...)
                r.setdefault(k, v)        # a case attr of the same name (job, world_size) wins
            out.append(r)
    return out


def _cells(r: dict) -> list[str]:
    ms = lambda k: f"{r[k] * 1e3:.3f}" if r.get(k) is not None else ""  # noqa: E731
    name = r["file"].rsplit("/", 1)[-1]
    return [name, r["id"], r["method"], r.get("variant") or "-", str(r["batch"]), str(r["context"]),
            str(r["world_size"]), r["dtype"], ms("time_median_s"), ms("time_p10_s"), ms("time_p90_s"),
            f"{100 * r.get('comm_fraction', 0):.1f}", f"{r['speedup']:.2f}x" if r.get("speedup") else "",
            f"{r['vs_peer']:.2f}x" if r.get("vs_peer") else "", _rate(r), f"{r['err_out']:.2e}" if r.get("err_out") is not None else "", check_text(r),
            r.get("status") or "-"]


LAMINA_KEYS = ["lamina_model_ranks", "lamina_attention_ranks", "lamina_microbatches", "decode_tok_s",
               "bytes_per_token", "handover_bytes", "lamina_model_util", "lamina_attention_util",
               "lamina_model_wait_frac", "lamina_attention_wait_frac", "lamina_model_cuda_graphs",
               "lamina_attention_cuda_graphs"]


def _lamina_line(r: dict) -> str:
    """The per-role line under the table for a Lamina case (generate.decode=lamina)."""
    pct = lambda k: f"{100 * r[k]:.0f}%" if r.get(k) is not None else "-"  # noqa: E731
    return (f"  {r['id']}: lamina {r['lamina_model_ranks']} model + {r['lamina_attention_ranks']} attention ranks, "
            f"{r['lamina_microbatches']} micro-batches: busy model {pct('lamina_model_util')} / attention "
            f"{pct('lamina_attention_util')}, waiting {pct('lamina_model_wait_frac')} / "
            f"{pct('lamina_attention_wait_frac')}; {r.get('bytes_per_token', 0):.0f} B/token; "
            f"decode {r.get('decode_tok_s', 0):.4g} tok/s; steps {r.get('lamina_model_cuda_graphs', 'eager')} / "
            f"{r.get('lamina_attention_cuda_graphs', 'eager')}")


def format_table(rows: list[dict]) -> str:
    lines = ["  ".join(h.rjust(w) if i > 3 else h.ljust(w) for i, (h, w) in enumerate(COLUMNS))]
    for r in rows:
        cells = _cells(r)
        lines.append("  ".join((c.rjust(w) if i > 3 else c.ljust(w))
                               for i, (c, (_, w)) in enumerate(zip(cells, COLUMNS))))
    lines += [_lamina_line(r) for r in rows if r.get("lamina_model_ranks") is not None]
    partial = sorted({r["method"] for r in rows if r.get("timed_work")})
    if partial:
        lines.append(f"note: {', '.join(partial)} prefill times are attention level: block rows only (the anchor "
                     f"rows a model also computes are not charged; record attribute timed_work); "
                     f"model level: hpcattn project CONFIG with job: generate")
    acc = format_accuracy_table(rows)
    return "\n".join(lines + ([acc] if acc else []))


def format_csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    keys = ["file", "id", "method", "variant", "job", "batch", "heads_q", "heads_kv", "head_dim", "context",
            "dtype", "causal", "world_size", "kernel", "transport", "time_median_s", "time_p10_s",
            "time_p90_s", "comm_fraction", "speedup", "vs_peer", "bytes_per_step", "peak_mem_bytes", "err_out",
            "err_lse", "base_err_out", "base_err_lse", "check", "check_passed", "check_reason", "nonfinite_out",
            "fidelity_rel_err", "query_err_out", "needle_recall", "prefill_median_s", "decode_step_median_s",
            "throughput_tok_s", "token_agreement", "logits_rel_err", "logits_max_err", "logits_base_err",
            "tokens_decided", "tokens_mismatched", "status"] + LAMINA_KEYS
    w.writerow(keys)
    for r in rows:
        w.writerow([check_text(r) if k == "check" else "" if r.get(k) is None else r.get(k) for k in keys])
    return buf.getvalue()
