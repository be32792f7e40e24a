"""Eval records (``job: eval``): the accuracy table of ``hpcattn report`` and the accuracy plot
(``hpcattn plot --kind accuracy``).

Table: one line per method x task x context x ranks (method = prefill+decode and its variant),
its accuracy (RULER's score: mean fraction of the reference strings found, in percent), the
number of samples, and the exact methods' accuracy at the same model, task and context beside it
(``exact``: the one-process run's when a record holds one, else the mean of the exact cases, ring
prefill, of the records given) and the difference.

Plot: accuracy against context (left) and against needle depth (right, 10 %-wide bins over the
needle tasks) per method x ranks, from the per-sample datasets.
"""

from __future__ import annotations

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


def accuracy_figure(paths: list[str], plt):
    """Accuracy vs context and vs needle depth per method x ranks (per-sample datasets)."""
    by_ctx: dict = defaultdict(lambda: defaultdict(list))      # label -> context -> scores
    by_depth: dict = defaultdict(lambda: defaultdict(list))    # label -> depth bin -> scores
    for path in paths:
        _, rows = read_cases(path, datasets=("correct", "depth"))
        for r in rows:
            if r.get("job") != "eval":
                continue
            ds = r.get("datasets", {})
            scores = ds["correct"][0] if "correct" in ds else np.asarray([])
            depth = ds["depth"][0] if "depth" in ds else np.full(len(scores), np.nan)
            label = method_label(r)
            by_ctx[label][r["context"]].extend(scores.tolist())
            for s, d in zip(scores, depth):
                if np.isfinite(d):
                    by_depth[label][min(int(d // 10), 9)].append(float(s))
    if not by_ctx:
        raise InputError(f"plot --kind accuracy: no eval cases (job: eval) in {', '.join(paths)}")
    fig, (ax_c, ax_d) = plt.subplots(1, 2, figsize=(13, 4.8))
    for label in sorted(by_ctx):
        ctx = sorted(by_ctx[label])
        ax_c.plot(ctx, [100 * np.mean(by_ctx[label][c]) for c in ctx], marker="o", label=label)
        bins = sorted(by_depth[label])
        if bins:
            ax_d.plot([10 * b + 5 for b in bins], [100 * np.mean(by_depth[label][b]) for b in bins], marker="o",
                      label=label)
    ax_c.set_xscale("log", base=2)
    ax_c.set_xlabel("context (tokens)")
    ax_c.set_ylabel("accuracy (%)")
    ax_c.set_title("accuracy vs context (all tasks)")
    ax_d.set_xlabel("needle depth (% of the context, 10 %-wide bins)")
    ax_d.set_ylabel("accuracy (%)")
    ax_d.set_title("accuracy vs needle depth (needle tasks, all contexts)")
    for ax in (ax_c, ax_d):
        ax.set_ylim(-3, 103)
        ax.grid(alpha=0.3)
    ax_c.legend(fontsize=6, loc="lower left")
    fig.tight_layout()
    return fig
