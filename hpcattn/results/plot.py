"""Offline plots of HDF5 records (never inside the MPI job): ``hpcattn plot FILES -o OUT --kind KIND``.

Kinds (docs/analysis.md shows each):

- ``time`` (default): median step time against context, one line per method/variant/ranks/batch/
  dtype, and the speedup against the ``local`` case of the same sweep point.
- ``breakdown``: one stacked bar per case: the slowest rank's compute, comm and merge time and the
  rest of its iteration (``other``), in the median timed repeat (the upper middle one for an even
  count), so a bar's height is that repeat's step time.
- ``scaling``: speedup against the single-device ``local`` case of the same shape (median over the
  records that have it) against the rank count, one line per case seen at two or more rank counts
  across the records, and the ideal line (speedup = ranks).
- ``bandwidth``: decode cases' effective KV bandwidth per device, the K/V bytes read once
  (:func:`~hpcattn.results.report.kv_bytes`) / median step time / devices (1 for ``local``, else the
  ranks), against context, with a ceiling line: ``--ceiling-tbs`` (e.g. the measured read ceiling of
  ``benchmarks/lean_decode.py``), else the vendor HBM figure of the records' GPU (``/meta/hosts/
  gpu_name``: H200, H20, H100 SXM, A100-SXM4-80GB), else none.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np

from hpcattn.errors import InputError
from hpcattn.results.accuracy import accuracy_figure
from hpcattn.results.compare import case_key, shape_key
from hpcattn.results.hdf5 import read_cases, read_hosts
from hpcattn.results.report import kv_bytes, rows_from_files

KINDS = ("time", "breakdown", "scaling", "bandwidth", "accuracy")
SUFFIXES = (".png", ".pdf", ".svg")
# vendor HBM bandwidth (TB/s) by a piece of torch.cuda.get_device_name(); first match wins (H200 before H20)
SPEC_HBM_TBS = (("H200", 4.8), ("H20", 4.0), ("H100 80GB HBM3", 3.35), ("A100-SXM4-80GB", 2.039))


def plot(paths: list[str], out: str, kind: str = "time", ceiling_tbs: float | None = None) -> str:
    """Draw ``kind`` from the records ``paths`` and write it to ``out`` (.png, .pdf or .svg)."""
    check_output(out)
    fig = figure(paths, kind, ceiling_tbs)
    import matplotlib.pyplot as plt

    try:
        fig.savefig(out, dpi=120)
    except OSError as e:
        raise InputError(f"plot -o {out}: cannot write ({e.strerror or e})") from None
    finally:
        plt.close(fig)
    return out


def check_output(out: str) -> None:
    """Raise InputError unless ``out`` is a writable-looking .png/.pdf/.svg name in an existing folder."""
    p = Path(out)
    if p.suffix.lower() not in SUFFIXES:
        raise InputError(f"plot -o {out}: unsupported suffix {p.suffix or '(none)'!r}, expected one of "
                         f"{', '.join(SUFFIXES)}")
    if p.is_dir():
        raise InputError(f"plot -o {out}: is a folder, expected a file name")
    if not p.parent.is_dir():
        what = "is not a folder" if p.parent.exists() else "does not exist"
        raise InputError(f"plot -o {out}: folder {p.parent} {what}")


def figure(paths: list[str], kind: str = "time", ceiling_tbs: float | None = None):
    """The matplotlib Figure of ``kind`` for the records ``paths`` (not saved; the caller closes it)."""
    if kind not in KINDS:
        raise InputError(f"plot --kind {kind}: expected one of {', '.join(KINDS)}")
    if ceiling_tbs is not None and (kind != "bandwidth" or not ceiling_tbs > 0):
        raise InputError(f"plot --ceiling-tbs {ceiling_tbs}: expected a bandwidth > 0 with --kind bandwidth")
    plt = _pyplot()
    if kind == "breakdown":
        return _breakdown(paths, plt)
    if kind == "accuracy":                       # eval records: hpcattn.results.accuracy
        return accuracy_figure(paths, plt)
    rows = rows_from_files(paths)
    if kind == "time":
        return _time(rows, plt)
    if kind == "scaling":
        return _scaling(rows, plt)
    return _bandwidth(rows, plt, ceiling_tbs, paths)


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise InputError("hpcattn plot needs matplotlib: pip install 'hpcattn[plot]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _label(r: dict, ranks: bool = True) -> str:
    where = f"p={r['world_size']}" if ranks else f"N={r['context']}"
    return f"{r['method']}" + (f" {r['variant']}" if r.get("variant") else "") + \
        f" ({where}, B={r['batch']}, {r['dtype']})"


def _series(rows: list[dict]) -> dict[str, list[dict]]:
    """Rows by line label (method, variant, ranks, batch, dtype), each sorted by context."""
    series = defaultdict(list)
    for r in rows:
        series[_label(r)].append(r)
    return {k: sorted(v, key=lambda r: r["context"]) for k, v in sorted(series.items())}


def _time(rows: list[dict], plt):
    fig, (ax_t, ax_s) = plt.subplots(1, 2, figsize=(12, 4.5))
    for label, rs in _series(rows).items():
        x = [r["context"] for r in rs]
        (line,) = ax_t.plot(x, [r["time_median_s"] * 1e3 for r in rs], marker="o", label=label)
        if any(r.get("speedup") for r in rs) and rs[0]["method"] != "local":
            ax_s.plot(x, [r.get("speedup") or float("nan") for r in rs], marker="o", label=label,
                      color=line.get_color())
    for ax in (ax_t, ax_s):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context (tokens)")
        ax.grid(True, which="both", alpha=0.3)
    ax_t.set_yscale("log")
    ax_t.set_ylabel("step time, median of max over ranks (ms)")
    ax_t.set_title("time vs context")
    ax_s.axhline(1.0, color="gray", lw=0.8)
    ax_s.set_ylabel("speedup vs local (same run)")
    ax_s.set_title("speedup vs single-device baseline")
    ax_t.legend(fontsize=7)
    if ax_s.lines[1:]:
        ax_s.legend(fontsize=7)
    fig.tight_layout()
    return fig


def phase_split(row: dict) -> dict[str, float] | None:
    """Seconds per phase of the slowest rank in the median repeat, plus ``other`` (the rest of its
    iteration); None for a case without ``phase_s``. ``row`` from ``read_cases(..., datasets=
    ("time_s", "phase_s"))``: time_s (T, R), phase_s (T, R, P) with attr ``phases``."""
    ds = row["datasets"]
    if "phase_s" not in ds:
        return None
    t = ds["time_s"][0]
    ph, attrs = ds["phase_s"]
    i = int(np.argsort(t.max(axis=1), kind="stable")[len(t) // 2])
    r = int(t[i].argmax())
    parts = dict(zip(attrs["phases"], ph[i, r].tolist()))
    parts["other"] = max(0.0, float(t[i, r] - ph[i, r].sum()))
    return parts


def _breakdown(paths: list[str], plt):
    bars = []                                     # (label, {phase: seconds})
    for path in paths:
        _, rows = read_cases(path, datasets=("time_s", "phase_s"))
        for r in rows:
            parts = phase_split(r)
            if parts is not None:
                name = (Path(path).name + ":" if len(paths) > 1 else "") + r["id"]
                bars.append((f"{name} N={r['context']} p={r['world_size']}", parts))
    if not bars:
        raise InputError(f"plot --kind breakdown: no case with a phase split (phase_s) in {', '.join(paths)} "
                         "(generate cases have none)")
    phases = list(dict.fromkeys(k for _, parts in bars for k in parts))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.45 * len(bars) + 2), 5))
    x = np.arange(len(bars))
    bottom = np.zeros(len(bars))
    for ph in phases:
        h = np.array([parts.get(ph, 0.0) for _, parts in bars]) * 1e3
        ax.bar(x, h, bottom=bottom, label=ph, color="lightgray" if ph == "other" else None)
        bottom += h
    ax.set_xticks(x, [label for label, _ in bars], rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("time of the slowest rank, median repeat (ms)")
    ax.set_title("phase breakdown per case")
    ax.legend(fontsize=8)
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    return fig


def _scaling(rows: list[dict], plt):
    base = defaultdict(list)                      # shape key -> local medians
    runs = defaultdict(lambda: defaultdict(list))  # case key without ranks -> ranks -> medians
    first = {}
    for r in rows:
        if r["method"] == "local":
            base[shape_key(r)].append(r["time_median_s"])
        else:
            k = case_key(r, ranks=False)
            runs[k][r["world_size"]].append(r["time_median_s"])
            first.setdefault(k, r)
    lines = []
    for k, by_p in runs.items():
        b = base.get(shape_key(first[k], "local"))
        if b and len(by_p) >= 2:
            ps = sorted(by_p)
            lines.append((_label(first[k], ranks=False), ps, [np.median(b) / np.median(by_p[p]) for p in ps]))
    if not lines:
        sizes = sorted({r["world_size"] for r in rows})
        raise InputError(f"plot --kind scaling: needs the same cases at two or more rank counts and a `local` case "
                         f"of their shape (records have rank counts {sizes})")
    fig, ax = plt.subplots(figsize=(7, 5))
    for label, ps, s in sorted(lines):
        ax.plot(ps, s, marker="o", label=label)
    ps = sorted({p for _, xs, _ in lines for p in xs})
    ax.plot(ps, ps, "k--", lw=0.8, label="ideal (speedup = ranks)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    ax.set_xlabel("ranks")
    ax.set_ylabel("speedup vs local (same shape)")
    ax.set_title("strong scaling across records")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def spec_hbm_tbs(gpu_name: str) -> float | None:
    """Vendor HBM bandwidth (TB/s) of a GPU named like torch.cuda.get_device_name(), None if unknown."""
    return next((bw for key, bw in SPEC_HBM_TBS if key in gpu_name), None)


def _ceiling(paths: list[str], given: float | None) -> tuple[float, str] | None:
    if given is not None:
        return given, f"ceiling {given:g} TB/s (--ceiling-tbs)"
    names = {n for p in paths for n in read_hosts(p).get("gpu_name", [])}
    if len(names) == 1 and (bw := spec_hbm_tbs(next(iter(names)))):
        return bw, f"spec HBM {next(iter(names))}: {bw:g} TB/s"
    return None


def _bandwidth(rows: list[dict], plt, ceiling_tbs: float | None, paths: list[str]):
    rows = [r for r in rows if r["job"] == "decode"]
    if not rows:
        raise InputError(f"plot --kind bandwidth: no decode case in {', '.join(paths)}")
    fig, ax = plt.subplots(figsize=(8, 5))
    for label, rs in _series(rows).items():
        bw = [kv_bytes(r) / r["time_median_s"] / (1 if r["method"] == "local" else r["world_size"]) / 1e12
              for r in rs]
        ax.plot([r["context"] for r in rs], bw, marker="o", label=label)
    ceiling = _ceiling(paths, ceiling_tbs)
    if ceiling:
        ax.axhline(ceiling[0], color="black", ls="--", lw=1.0, label=ceiling[1])
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("context (tokens)")
    ax.set_ylabel("KV bytes read once / step time / device (TB/s)")
    ax.set_title("decode bandwidth per device" + ("" if ceiling else " (no ceiling: pass --ceiling-tbs)"))
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig
