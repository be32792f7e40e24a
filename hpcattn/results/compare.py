"""``hpcattn compare OLD.h5 NEW.h5``: the cases two records share, new/old median step time with the
repeat spread of each, and the regressions beyond noise; the exit status is for CI.

Matching (:func:`case_key`): a case is the same case in both records when job, method, variant,
rank count, shape (batch, heads_q, heads_kv, head_dim, context, lengths, dtype, causal, query_len)
and the rest of its sweep point are equal. Sweep-point entries of another method's section
(``tree.reduction`` on the ``local`` case) and the ``shape.*`` entries (already in the shape) do
not count, so runs of differently written sweeps still match.

Rule, per matched case, from the recorded step times (max over ranks per timed repeat):
``ratio = new median / old median``; each record's relative spread is half its p10-p90 band,
``(p90 - p10) / (2 median)``; ``tol = max(threshold, old spread + new spread)``. The case is
``slower`` (a regression) when ``ratio > 1 + tol``, ``faster`` when ``ratio < 1 / (1 + tol)``,
else ``same``. Exit status: 0 no regression, 1 at least one ``slower`` case, 2 a user error
(unreadable record, no case in common, negative threshold). Unmatched cases are listed; they do
not change the exit status.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from hpcattn.config import METHODS_BY_JOB
from hpcattn.errors import InputError
from hpcattn.results.hdf5 import read_cases

SHAPE_KEYS = ("batch", "heads_q", "heads_kv", "head_dim", "context", "lengths", "dtype", "causal", "query_len")
METHOD_SECTIONS = {m for ms in METHODS_BY_JOB.values() for m in ms}


def shape_key(row: dict, method: str | None = None) -> tuple:
    """Job, shape and the sweep-point entries that concern ``method`` (default: the case's own;
    ``ring+tree`` concerns ``ring.*`` and ``tree.*``) - what two cases of equal work share."""
    own = set((method or row["method"]).split("+"))
    point = {k: v for k, v in (row.get("sweep_point") or {}).items()
             if not k.startswith("shape.") and not (k.split(".")[0] in METHOD_SECTIONS - own)}
    return (row["job"], *(json.dumps(row.get(k)) for k in SHAPE_KEYS), json.dumps(point, sort_keys=True))


def case_key(row: dict, ranks: bool = True) -> tuple:
    """The identity of a case across records: method, variant, shape key [, world size]."""
    return (row["method"], row.get("variant") or "", *shape_key(row)) + ((row["world_size"],) if ranks else ())


@dataclass
class Match:
    old: dict
    new: dict
    ratio: float           # new median / old median
    tol: float             # max(threshold, old spread + new spread)
    verdict: str           # "slower", "faster" or "same"


@dataclass
class Comparison:
    old_path: str
    new_path: str
    threshold: float
    matches: list[Match] = field(default_factory=list)
    only_old: list[dict] = field(default_factory=list)
    only_new: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def regressions(self) -> list[Match]:
        return [m for m in self.matches if m.verdict == "slower"]

    @property
    def exit_status(self) -> int:
        return 1 if self.regressions else 0


def spread(row: dict) -> float:
    """Half the p10-p90 band of the step time, relative to the median."""
    return (row["time_p90_s"] - row["time_p10_s"]) / (2 * row["time_median_s"])


def _by_key(path: str) -> tuple[dict, dict]:
    meta, rows = read_cases(path)
    out: dict = {}
    for r in rows:
        k = case_key(r)
        if k in out:
            raise InputError(f"{path}: cases {out[k]['id']} and {r['id']} are the same case (method, variant, "
                             "shape, sweep point); compare needs each case once per record")
        out[k] = r
    return meta, out


def compare(old_path: str, new_path: str, threshold: float = 0.05) -> Comparison:
    """Match the cases of two records and apply the rule of this module's docstring."""
    if not threshold >= 0:
        raise InputError(f"compare --threshold: expected a fraction >= 0 (0.05 = 5%), got {threshold}")
    res = Comparison(old_path, new_path, threshold)
    sides = [_by_key(old_path), _by_key(new_path)]
    for path, (meta, _) in zip((old_path, new_path), sides):
        if meta.get("status") != "complete":
            res.notes.append(f"{path}: status {meta.get('status')!r} (not a finished run)")
    (_, old), (_, new) = sides
    for k, o in old.items():
        n = new.get(k)
        if n is None:
            res.only_old.append(o)
            continue
        ratio = n["time_median_s"] / o["time_median_s"]
        tol = max(threshold, spread(o) + spread(n))
        verdict = "slower" if ratio > 1 + tol else "faster" if ratio < 1 / (1 + tol) else "same"
        res.matches.append(Match(o, n, ratio, tol, verdict))
    res.only_new = [n for k, n in new.items() if k not in old]
    if not res.matches:
        raise InputError(f"{old_path} and {new_path} have no case in common (cases match by job, method, "
                         "variant, ranks, shape and sweep point)")
    return res


def format_comparison(res: Comparison) -> str:
    """Fixed-width table of the matched cases, the unmatched ones and a summary line."""
    ms = lambda r, k: f"{r[k] * 1e3:.3f}"  # noqa: E731
    band = lambda r: f"{ms(r, 'time_p10_s')}-{ms(r, 'time_p90_s')}"  # noqa: E731
    head = (f"{'case':30} {'method':6} {'variant':18} {'N':>8} {'p':>3} {'dtype':8} {'old_ms':>9} "
            f"{'old_p10-p90':>17} {'new_ms':>9} {'new_p10-p90':>17} {'new/old':>7} {'tol%':>6}  verdict")
    lines = [head]
    for m in res.matches:
        o, n = m.old, m.new
        lines.append(f"{n['id']:30} {n['method']:6} {n.get('variant') or '-':18} {n['context']:>8} "
                     f"{n['world_size']:>3} {n['dtype']:8} {ms(o, 'time_median_s'):>9} {band(o):>17} "
                     f"{ms(n, 'time_median_s'):>9} {band(n):>17} {m.ratio:>6.3f}x {100 * m.tol:>6.1f}  {m.verdict}")
    for label, rows in (("only in " + res.old_path, res.only_old), ("only in " + res.new_path, res.only_new)):
        if rows:
            lines.append(f"{label}: {', '.join(r['id'] for r in rows)}")
    lines += [f"note: {x}" for x in res.notes]
    faster = sum(m.verdict == "faster" for m in res.matches)
    lines.append(f"compare: {len(res.matches)} matched, {len(res.regressions)} slower, {faster} faster beyond "
                 f"max(threshold {100 * res.threshold:g}%, spread); {len(res.only_old)} only in old, "
                 f"{len(res.only_new)} only in new")
    return "\n".join(lines)
