"""pandas tables of HDF5 records, for notebooks and scripts (needs pandas: the ``analysis`` extra).

- :func:`load`: one row per case, every attribute (docs/analysis.md lists the columns).
- :func:`load_ranks`: one row per case x timed repeat x rank x phase (the raw per-rank timings).

Both read through :func:`hpcattn.results.hdf5.read_cases`, the reader of ``hpcattn report``, so they
see the same cases (an unfinished run's ``NAME.tmp`` included). Importing this module does not
import pandas; calling :func:`load` or :func:`load_ranks` without it is an :class:`HpcattnError`.
"""

from __future__ import annotations

import os

import numpy as np

from hpcattn.errors import HpcattnError
from hpcattn.results.hdf5 import read_cases
from hpcattn.results.report import rows_from_files

RANK_COLUMNS = ("file", "id", "method", "variant", "world_size", "context")  # case columns of load_ranks


def _pandas():
    try:
        import pandas
    except ImportError:
        raise HpcattnError("hpcattn.results.load/load_ranks need pandas: pip install 'hpcattn[analysis]'") from None
    return pandas


def _paths(paths) -> list[str]:
    """One path (str or PathLike) or a list of them -> list of str."""
    return [os.fspath(paths)] if isinstance(paths, (str, os.PathLike)) else [os.fspath(p) for p in paths]


def load(paths):
    """One row per case of the records ``paths`` (a path or a list of paths), in record order.

    Columns: ``file``, ``id``; every case attribute (method, variant, shape, time_median_s, ...,
    ``sweep_point`` as a dict); each sweep-point entry as a column named by its config key
    (``shape.context``, ``tree.reduction``); ``speedup`` and ``vs_peer`` as ``hpcattn report``
    computes them; and the record's root attributes (``status``, ``git_commit``, ``transport``,
    versions, ...; a case attribute of the same name, e.g. ``world_size``, wins).
    """
    pd = _pandas()
    rows = rows_from_files(_paths(paths))
    for r in rows:
        for k, v in (r.get("sweep_point") or {}).items():
            r.setdefault(k, v)
    df = pd.DataFrame(rows)
    return df[["file", "id"] + [c for c in df.columns if c not in ("file", "id")]] if rows else df


def load_ranks(paths):
    """One row per (case, timed repeat, rank, phase) of the records ``paths``.

    Columns: the case's ``file``, ``id``, ``method``, ``variant``, ``world_size``, ``context`` (join
    with :func:`load` on ``["file", "id"]`` for any other attribute); ``repeat`` (0..repeats-1, warm-ups
    excluded), ``rank``, ``time_s`` (that rank's whole iteration: ``time_s[repeat, rank]``), ``phase``
    (``compute``/``comm``/``merge``), ``phase_s`` (its time in that phase: ``phase_s[repeat, rank,
    phase]``) and ``bytes_per_step`` (its payload bytes per step in that phase; equal for every
    repeat). Cases without a phase split (``job: generate``) give one row per repeat x rank with
    ``phase`` None and ``phase_s``/``bytes_per_step`` NaN.
    """
    pd = _pandas()
    frames = []
    for path in _paths(paths):
        _, rows = read_cases(path, datasets=("time_s", "phase_s", "bytes_per_step"))
        for r in rows:
            cols = _rank_columns(r["datasets"])
            n = len(cols["rank"])
            frames.append(pd.DataFrame({c: [r.get(c)] * n for c in RANK_COLUMNS} | cols))
    if not frames:
        return pd.DataFrame(columns=[*RANK_COLUMNS, "repeat", "rank", "time_s", "phase", "phase_s",
                                     "bytes_per_step"])
    return pd.concat(frames, ignore_index=True)


def _rank_columns(ds: dict) -> dict[str, np.ndarray]:
    """The long-table columns of one case's datasets: time_s (T, R), phase_s (T, R, P) with attr
    ``phases``, bytes_per_step (R, P') with attr ``phases`` (matched to phase_s's by name)."""
    t = ds["time_s"][0]
    T, R = t.shape
    if "phase_s" not in ds:
        rep, rank = (i.ravel() for i in np.indices((T, R)))
        nan = np.full(T * R, np.nan)
        return {"repeat": rep, "rank": rank, "time_s": t.ravel(), "phase": np.full(T * R, None), "phase_s": nan,
                "bytes_per_step": nan}
    ph, pattrs = ds["phase_s"]
    names = list(pattrs["phases"])
    rep, rank, k = (i.ravel() for i in np.indices(ph.shape))
    by = np.full((R, len(names)), np.nan)
    if "bytes_per_step" in ds:
        b, battrs = ds["bytes_per_step"]
        for j, name in enumerate(battrs.get("phases") or []):
            if name in names:
                by[:, names.index(name)] = b[:, j]
    bcol = by[rank, k]
    if not np.isnan(bcol).any():
        bcol = bcol.astype(np.int64)
    return {"repeat": rep, "rank": rank, "time_s": t[rep, rank], "phase": np.asarray(names, dtype=object)[k],
            "phase_s": ph.ravel(), "bytes_per_step": bcol}
