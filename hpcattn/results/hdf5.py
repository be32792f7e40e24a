"""The HDF5 record of a run (schema in docs/hdf5.md). Rank 0 writes; readers are offline.

Crash safety: no file is ever modified when a kill could leave it half-written. The metadata go to
``NAME.tmp`` (written and closed at start, ``status = "running"``); each finished case goes to its
own file in ``NAME.tmp.d/`` (written as ``*.partial``, then renamed). :meth:`RecordWriter.close`
merges the case files into ``NAME.tmp``, sets ``status = "complete"`` and renames it to ``NAME``.
A run that dies leaves ``NAME.tmp`` + ``NAME.tmp.d/`` with every case finished so far:
:func:`read_cases` (and so ``hpcattn report``) reads the pair as one record, and :func:`recover`
(``hpcattn recover NAME.tmp``) merges it into ``NAME`` with ``status = "incomplete"``.

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
import shutil
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


def parts_dir(tmp: Path) -> Path:
    """Folder of the per-case files of ``NAME.tmp`` (``NAME.tmp.d``)."""
    return tmp.with_name(tmp.name + ".d")


def _part_files(tmp: Path) -> list[tuple[str, Path]]:
    """(case id, file) of ``tmp``'s finished cases in write order (names ``<seq>-<case id>.h5``)."""
    d = parts_dir(tmp)
    return [(p.stem.split("-", 1)[1], p) for p in sorted(d.glob("*.h5"))] if d.is_dir() else []


class RecordWriter:
    """Writes one run's record. Use on rank 0 only.

    Args:
        path: final file name; data goes to ``path + ".tmp"`` (metadata) and ``path + ".tmp.d/"``
            (one file per finished case) until :meth:`close`.
        attrs: root attributes (run metadata).
        config_yaml: the resolved config.
        hosts: per-rank dicts with equal keys (rank, local_rank, node, hostname, device, ...).
        kernel_info: the kernel selection/self-test report.
    """

    def __init__(self, path: str, attrs: dict, config_yaml: str, hosts: list[dict], kernel_info: dict):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.path.with_name(self.path.name + ".tmp")
        self.parts = parts_dir(self.tmp)
        shutil.rmtree(self.parts, ignore_errors=True)        # a crashed earlier run to the same NAME
        with h5py.File(self.tmp, "w", track_order=True) as f:
            for k, v in attrs.items():
                f.attrs[k] = _attr(v)
            f.attrs["schema_version"] = SCHEMA_VERSION
            f.attrs["status"] = "running"
            meta = f.create_group("meta", track_order=True)
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
            f.create_group("cases", track_order=True)
        self.parts.mkdir()
        self.written = 0

    def write_case(self, case_id: str, attrs: dict, datasets: dict[str, tuple[np.ndarray, dict]]) -> None:
        """Write one finished case to its own file, atomically. ``datasets``: name -> (array, attrs)."""
        final = self.parts / f"{self.written:05d}-{case_id}.h5"
        partial = final.with_name(final.name + ".partial")
        with h5py.File(partial, "w", track_order=True) as f:
            g = f.create_group("case", track_order=True)
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
        with open(partial, "rb") as fh:                      # on disk before it counts as finished
            os.fsync(fh.fileno())
        os.replace(partial, final)
        self.written += 1

    def close(self, status: str = "complete") -> Path:
        """Merge the case files, mark the record finished and atomically rename it to its name."""
        return _finish(self.tmp, self.path, status)


def _finish(tmp: Path, path: Path, status: str) -> Path:
    """Merge ``tmp`` and its case files into ``path`` with ``status``; drop ``tmp`` and the folder.

    The merge goes to a copy (``path.merging``) renamed over ``path`` when whole, so ``tmp`` and
    its case files stay intact until then: a kill during the merge loses nothing, and repeating
    it (``recover``) starts again from the same files."""
    merging = path.with_name(path.name + ".merging")
    shutil.copyfile(tmp, merging)
    with h5py.File(merging, "a") as f:
        for cid, part in _part_files(tmp):
            with h5py.File(part, "r") as src:
                src.copy(src["case"], f["cases"], name=cid)
        f.attrs["status"] = status
    os.replace(merging, path)
    tmp.unlink()
    shutil.rmtree(parts_dir(tmp), ignore_errors=True)
    return path


def recover(tmp: str, output: str | None = None) -> Path:
    """Turn a crashed run's ``NAME.tmp`` (+ ``NAME.tmp.d/``) into one file, ``status = "incomplete"``.

    ``output`` defaults to NAME (the ``.tmp`` suffix dropped). Raises InputError for anything else."""
    from hpcattn.errors import InputError

    t = Path(tmp)
    if t.suffix != ".tmp" or not t.is_file():
        raise InputError(f"{tmp}: expected the NAME.tmp file of an unfinished run")
    meta, _ = read_cases(tmp)                      # validates that it is a record
    if meta.get("status") != "running":
        raise InputError(f"{tmp}: status is {meta.get('status')!r}, not 'running'")
    return _finish(t, Path(output) if output else t.with_suffix(""), "incomplete")


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
        rows = [_row(cid, g, path) for cid, g in f["cases"].items()]
    for cid, part in _part_files(Path(path)):      # an unfinished run's cases (NAME.tmp.d/)
        with h5py.File(part, "r", locking=False) as src:
            rows.append(_row(cid, src["case"], path))
    return meta, rows


def _row(cid: str, g, path: str) -> dict:
    row = {k: _decode(v) for k, v in g.attrs.items()}
    row["id"] = cid
    row["file"] = str(path)
    return row


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
