"""Offline plots of HDF5 records (never inside the MPI job): step time against context length per
method/variant, and the speedup against the ``local`` baseline of the same sweep point."""

from __future__ import annotations

from collections import defaultdict

from hpcattn.results.report import rows_from_files


def plot(paths: list[str], out: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = rows_from_files(paths)
    series = defaultdict(list)
    for r in rows:
        label = f"{r['method']}" + (f" {r['variant']}" if r.get("variant") else "") + \
            f" (p={r['world_size']}, B={r['batch']}, {r['dtype']})"
        series[label].append(r)
    fig, (ax_t, ax_s) = plt.subplots(1, 2, figsize=(12, 4.5))
    for label, rs in sorted(series.items()):
        rs.sort(key=lambda r: r["context"])
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
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
