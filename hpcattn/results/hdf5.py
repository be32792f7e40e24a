"""The HDF5 record of a run (schema in docs/hdf5.md). Rank 0 writes; readers are offline.

Crash safety: the file is written as ``NAME.tmp`` and renamed to ``NAME`` when the run ends
(``status = "complete"``). Every finished case is flushed as soon as it completes, so a run that
dies later leaves a readable ``NAME.tmp`` (``status = "running"``) with the cases finished so far.

Layout::

    /                    attrs: run metadata (versions, transport, world size, status, ...)
    /meta/config_yaml    the fully resolved config (re-running from it reproduces the run)
    /meta/hosts/*        per-rank datasets: rank, local_rank, node, hostname, device, gpu_name
    /meta/kernel         attrs: the kernel self-test results
    /cases/<id>          attrs: method, variant, shape, summary (median/p10/p90, errors, pass)
    /cases/<id>/time_s   (repeats, ranks) float64 seconds, warm-ups excluded
    /cases/<id>/phase_s  (repeats, ranks, phases) float64, attr phases
    /cases/<id>/bytes_per_step  (ranks, phases) int64 payload bytes per step
    /cases/<id>/peak_mem_bytes  (ranks,) int64
    /cases/<id>/out, lse optional gathered outputs (float32)
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import h5py
import numpy as np

SCHEMA_VERSION = 1


def _attr(v):
    """Convert a value to something h5py stores as an attribute."""
    if v is None:
        return "null"
    if isinstance(v, (dict, list, tuple)):
        return json.dumps(v)
    if isinstance(v, (bool, np.bool_)):
        return bool(v)
    if isinstance(v, str):
        # plain str (h5py cannot store str subclasses such as torch.__version__), without the NUL
        # bytes some MPI libraries put in their version strings (HDF5 strings cannot hold them)
        return str(v).replace("\x00", "")
    return v


class RecordWriter:
    """Writes one run's record. Use on rank 0 only.

    Args:
        path: final file name; data goes to ``path + ".tmp"`` until :meth:`close`.
        attrs: root attributes (run metadata).
        config_yaml: the resolved config.
        hosts: per-rank dicts with equal keys (rank, local_rank, node, hostname, device, ...).
        kernel_info: the kernel selection/self-test report.
    """

    def __init__(self, path: str, attrs: dict, config_yaml: str, hosts: list[dict], kernel_info: dict):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.path.with_name(self.path.name + ".tmp")
        self.f = h5py.File(self.tmp, "w", track_order=True)
        for k, v in attrs.items():
            self.f.attrs[k] = _attr(v)
        self.f.attrs["schema_version"] = SCHEMA_VERSION
        self.f.attrs["status"] = "running"
        meta = self.f.create_group("meta", track_order=True)
        meta.create_dataset("config_yaml", data=config_yaml, dtype=h5py.string_dtype())
        hg = meta.create_group("hosts", track_order=True)
        for key in hosts[0]:
            vals = [h[key] for h in hosts]
            if all(isinstance(x, (int, np.integer)) for x in vals):
                hg.create_dataset(key, data=np.asarray(vals, dtype=np.int64))
            else:
                hg.create_dataset(key, data=[str(x) for x in vals], dtype=h5py.string_dtype())
        kg = meta.create_group("kernel")
        for k, v in kernel_info.items():
            kg.attrs[k] = _attr(v)
        self.cases = self.f.create_group("cases", track_order=True)
        self.f.flush()

    def write_case(self, case_id: str, attrs: dict, datasets: dict[str, tuple[np.ndarray, dict]]) -> None:
        """Write one finished case and flush. ``datasets``: name -> (array, attrs)."""
        g = self.cases.create_group(case_id, track_order=True)
        for k, v in attrs.items():
            g.attrs[k] = _attr(v)
        for name, (arr, dattrs) in datasets.items():
            arr = np.asarray(arr)
            kw = {}
            if arr.dtype.kind == "f" and arr.size > 4096:
                kw = {"compression": "gzip", "shuffle": True, "chunks": True}
            ds = g.create_dataset(name, data=arr, **kw)
            for k, v in dattrs.items():
                ds.attrs[k] = _attr(v)
        self.f.flush()

    def close(self, status: str = "complete") -> Path:
        """Mark the record finished, close it and atomically rename it to its final name."""
        self.f.attrs["status"] = status
        self.f.close()
        os.replace(self.tmp, self.path)
        return self.path


def read_cases(path: str) -> tuple[dict, list[dict]]:
    """Read a record: (root attrs, [case summary dict per case, with 'id' and 'file']).

    Raises hpcattn.errors.InputError for a file that is not an hpcattn record.
    """
    from hpcattn.errors import InputError

    try:
        f = h5py.File(path, "r", locking=False)   # readers never lock (crashed writers, Lustre)
    except (OSError, FileNotFoundError) as e:
        raise InputError(f"{path}: cannot open as HDF5 ({e})") from None
    with f:
        if "cases" not in f or "schema_version" not in f.attrs:
            raise InputError(f"{path}: not an hpcattn record (no /cases group)")
        meta = {k: _decode(v) for k, v in f.attrs.items()}
        rows = []
        for cid, g in f["cases"].items():
            row = {k: _decode(v) for k, v in g.attrs.items()}
            row["id"] = cid
            row["file"] = str(path)
            rows.append(row)
    return meta, rows


def _decode(v):
    if isinstance(v, bytes):
        v = v.decode()
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, str) and v[:1] in "[{":
        try:
            return json.loads(v)
        except ValueError:
            return v
    if v == "null":
        return None
    return v
