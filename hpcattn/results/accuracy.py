"""Eval records (``job: eval``): the accuracy table of ``hpcattn report`` and the accuracy plot
(``hpcattn plot --kind accuracy``).

Table: one line per method x task x context x ranks (method = prefill+decode and its variant),
its accuracy (RULER's score: mean fraction of the reference strings found, in percent), the
number of samples, and the exact methods' accuracy at the same model, task and context beside it
(``exact``: the one-process run's when a record holds one, else the mean of the exact cases, ring
prefill, of the records given) and the difference.

Plot: one column per rank count, accuracy against context (top) and against needle depth (bottom,
10 %-wide bins over the needle tasks) per method (``series_label``: the variant's context-dependent
lengths replaced by their rule), the exact one-process run beside them, from the per-sample datasets.
"""

from __future__ import annotations

import re
from collections import defaultdict

import numpy as np

from hpcattn.errors import InputError
from hpcattn.results.hdf5 import read_cases


def _key(r: dict) -> tuple:
    return (str(r.get("model")), r["context"])


def method_label(r: dict) -> str:
    """``prefill+decode variant (p=ranks)``."""
    return f"{r['method']}" + (f" {r['variant']}" if r.get("variant") else "") + f" (p={r['world_size']})"


def exact_accuracy(rows: list[dict]) -> dict:
    """(model, context, task) -> the exact methods' accuracy: the one-process case's when there is
    one, else the mean over the exact cases."""
    one, anyx = {}, defaultdict(list)
    for r in rows:
        if r.get("job") != "eval" or not r.get("exact"):
            continue
        for task, acc in (r.get("accuracy_by_task") or {}).items():
            k = _key(r) + (task,)
            anyx[k].append(acc)
            if r["world_size"] == 1:
                one[k] = acc
    return {k: one.get(k, float(np.mean(v))) for k, v in anyx.items()}


def format_accuracy_table(rows: list[dict]) -> str:
    """The accuracy lines of the eval rows among ``rows`` ("" when there are none)."""
    ev = [r for r in rows if r.get("job") == "eval"]
    if not ev:
        return ""
    exact = exact_accuracy(ev)
    head = f"{'method':62} {'task':16} {'N':>6} {'p':>3} {'n':>4} {'acc%':>6} {'exact%':>7} {'diff':>6}"
    lines = ["accuracy (RULER string_match_all; exact: the exact methods' accuracy at the same model, task, N)", head]
    items = []
    for r in ev:
        for task, acc in (r.get("accuracy_by_task") or {}).items():
            items.append((task, r["context"], r["world_size"], method_label(r), acc, r, exact.get(_key(r) + (task,))))
    for task, n, p, label, acc, r, ex in sorted(items, key=lambda x: (x[0], x[1], x[2], x[3])):
        ex_txt = f"{100 * ex:7.1f}" if ex is not None else f"{'-':>7}"
        diff = f"{100 * (acc - ex):+6.1f}" if ex is not None else f"{'-':>6}"
        lines.append(f"{label[:62]:62} {task:16} {n:>6} {p:>3} {r.get('samples_per_task', 0):>4} "
                     f"{100 * acc:6.1f} {ex_txt} {diff}")
    return "\n".join(lines)


def series_label(r: dict) -> str:
    """The method's name stable across contexts (the plot's series): the variant's lengths that
    follow the context (APB's ``la``/``lp``, Star's anchor in tokens) become their rule, e.g.
    ``Star, anchor = block/4`` or ``APB, query_aware``; the exact one-process run is ``exact``."""
    prefill, variant = r.get("prefill") or r["method"].split("+")[0], r.get("variant") or ""
    if r["world_size"] == 1 and r.get("exact"):
        return "exact (one process)"
    if prefill == "star":
        m = re.search(r"anchor(\d+|block)", variant)
        anchor = m.group(1) if m else "block"
        if anchor != "block":
            block = (r["context"] - int(r.get("query_len") or 0)) // r["world_size"]
            k = max(1, round(block / int(anchor)))
            anchor = f"block/{k}" if block // k == int(anchor) else f"{anchor} tokens"
        return f"Star, anchor = {anchor}"
    if prefill == "apb":
        m = re.search(r"la\d+-lp\d+-([A-Za-z_]+)", variant)
        return f"APB, {m.group(1) if m else variant.split('/')[0]}"
    return f"{prefill}{' (exact)' if r.get('exact') else ''}"


def accuracy_figure(paths: list[str], plt):
    """One column per rank count: accuracy vs context (top) and vs needle depth (bottom, 10 %-wide
    bins over the needle tasks) per method, the exact one-process run in black in every column."""
    by_ctx: dict = defaultdict(lambda: defaultdict(list))      # (p, series) -> context -> scores
    by_depth: dict = defaultdict(lambda: defaultdict(list))    # (p, series) -> depth bin -> scores
    for path in paths:
        _, rows = read_cases(path, datasets=("correct", "depth"))
        for r in rows:
            if r.get("job") != "eval":
                continue
            ds = r.get("datasets", {})
            scores = ds["correct"][0] if "correct" in ds else np.asarray([])
            depth = ds["depth"][0] if "depth" in ds else np.full(len(scores), np.nan)
            key = (r["world_size"], series_label(r))
            by_ctx[key][r["context"]].extend(scores.tolist())
            for s, d in zip(scores, depth):
                if np.isfinite(d):
                    by_depth[key][min(int(d // 10), 9)].append(float(s))
    if not by_ctx:
        raise InputError(f"plot --kind accuracy: no eval cases (job: eval) in {', '.join(paths)}")
    ranks = sorted({p for p, _ in by_ctx if p > 1}) or [1]
    fig, axes = plt.subplots(2, len(ranks), figsize=(4.6 * len(ranks) + 1, 8), squeeze=False)
    for col, p in enumerate(ranks):
        ax_c, ax_d = axes[0][col], axes[1][col]
        keys = [k for k in sorted(by_ctx) if k[0] == 1] + ([k for k in sorted(by_ctx) if k[0] == p] if p > 1 else [])
        for key in keys:
            style = dict(color="black", linestyle="--", linewidth=2) if key[0] == 1 else {}
            ctx = sorted(by_ctx[key])
            ax_c.plot(ctx, [100 * np.mean(by_ctx[key][c]) for c in ctx], marker="o", label=key[1], **style)
            bins = sorted(by_depth[key])
            if bins:
                ax_d.plot([10 * b + 5 for b in bins], [100 * np.mean(by_depth[key][b]) for b in bins],
                          marker="o", label=key[1], **style)
        ax_c.set_xscale("log", base=2)
        ax_c.set_xlabel("context (tokens)")
        ax_c.set_title(f"{p} rank{'s' if p > 1 else ''}: accuracy vs context (all tasks)", fontsize=10)
        ax_d.set_xlabel("needle depth (% of the context, 10 %-wide bins)")
        ax_d.set_title(f"{p} rank{'s' if p > 1 else ''}: vs needle depth (needle tasks)", fontsize=10)
        for ax in (ax_c, ax_d):
            ax.set_ylim(-3, 103)
            ax.set_ylabel("accuracy (%)")
            ax.grid(alpha=0.3)
        ax_c.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    return fig
