"""The HDF5 record of a run (schema in docs/hdf5.md). Rank 0 writes; readers are offline.

Crash safety: no file is ever modified when a kill could leave it half-written. The metadata go to
``NAME.tmp`` (written and closed at start, ``status = "running"``); each finished case goes to its
own file in ``NAME.tmp.d/`` (written as ``*.partial``, then renamed). :meth:`RecordWriter.close`
merges the case files into ``NAME.tmp``, sets ``status = "complete"`` and renames it to ``NAME``.
A run that dies leaves ``NAME.tmp`` + ``NAME.tmp.d/`` with every case finished so far:
:func:`read_cases` (and so ``hpcattn report``) reads the pair as one record, and :func:`recover`
(``hpcattn recover NAME.tmp``) merges it into ``NAME`` with ``status = "incomplete"``. A record
that is truncated or corrupt is an InputError naming it; one unreadable case file of a
``NAME.tmp`` is skipped (read, recover) with a warning naming it, the others are kept.
``NAME.tmp.lock`` (:func:`take_lock`) keeps a second run from writing (and deleting) the same record.

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

import errno
import json
import os
import shutil
import socket
import sys
import time
from pathlib import Path

import h5py
import numpy as np

from hpcattn.errors import InputError, shown

SCHEMA_VERSION = 1
# what h5py raises for a truncated or corrupt file (found by truncating and overwriting records)
UNREADABLE = (OSError, RuntimeError, KeyError, ValueError, TypeError)
# root attr ``kind`` of the file ``hpcattn project -o`` writes (hpcattn/jobs/projection.py; docs/hdf5.md)
PROJECTION_KIND = "hpcattn projection"


class ProjectionFile(InputError):
    """:func:`read_cases` of a projection file (``hpcattn project -o``: projected rows, not a run's
    cases). :func:`hpcattn.results.report.rows_from_files` skips it with one warning line; for
    every other reader it is an error like any file that is not a record."""


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
        # bytes that are not UTF-8 (a file name in sys.argv) as \xNN escapes: HDF5 text is UTF-8
        return shown(str(v).replace("\x00", ""))
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
        self.tmp = self.path.with_name(self.path.name + ".tmp")
        self.parts = parts_dir(self.tmp)
        check_output_path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.lock = take_lock(self.tmp)            # raises InputError while another run holds it
        except OSError as e:
            raise InputError(f"output {path}: cannot write in {self.path.parent}: {_os_reason(e)}") from None
        if self.tmp.exists() or self.parts.exists():        # never delete finished work
            self.lock.unlink(missing_ok=True)
            raise InputError(_leftover_message(self.tmp, None))
        try:
            self._start(attrs, config_yaml, hosts, kernel_info)
        except BaseException as e:                          # undo what this writer created
            self.tmp.unlink(missing_ok=True)
            shutil.rmtree(self.parts, ignore_errors=True)
            self.lock.unlink(missing_ok=True)
            if isinstance(e, OSError):
                raise InputError(f"output {path}: cannot write {self.tmp}: {_os_reason(e)}") from None
            raise
        self.written = 0

    def _start(self, attrs: dict, config_yaml: str, hosts: list[dict], kernel_info: dict) -> None:
        with h5py.File(self.tmp, "w", track_order=True) as f:
            for k, v in attrs.items():
                f.attrs[k] = _attr(v)
            f.attrs["schema_version"] = SCHEMA_VERSION
            f.attrs["status"] = "running"
            meta = f.create_group("meta", track_order=True)
            meta.create_dataset("config_yaml", data=shown(config_yaml), dtype=h5py.string_dtype())
            hg = meta.create_group("hosts", track_order=True)
            for key in hosts[0]:
                vals = [h[key] for h in hosts]
                if all(isinstance(x, (int, np.integer)) for x in vals):
                    hg.create_dataset(key, data=np.asarray(vals, dtype=np.int64))
                else:
                    hg.create_dataset(key, data=[shown(str(x)) for x in vals], dtype=h5py.string_dtype())
            kg = meta.create_group("kernel")
            for k, v in kernel_info.items():
                kg.attrs[k] = _attr(v)
            f.create_group("cases", track_order=True)
        self.parts.mkdir()

    def write_case(self, case_id: str, attrs: dict, datasets: dict[str, tuple[np.ndarray, dict]]) -> None:
        """Write one finished case to its own file, atomically. ``datasets``: name -> (array, attrs).
        A full file system (or quota) is an InputError naming it and the bytes needed; the
        half-written file is removed, the finished cases stay."""
        final = self.parts / f"{self.written:05d}-{case_id}.h5"
        partial = final.with_name(final.name + ".partial")
        try:
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
        except BaseException as e:
            partial.unlink(missing_ok=True)
            if _no_space(e):
                need = sum(np.asarray(a).nbytes for a, _ in datasets.values()) + (64 << 10)
                raise InputError(self._full(e, f"case {case_id}", need)) from None
            raise
        self.written += 1

    def close(self, status: str = "complete") -> Path:
        """Merge the case files, mark the record finished, atomically rename it to its name and
        release the lock. A full file system is an InputError (the case files stay: recover)."""
        try:
            path = _finish(self.tmp, self.path, status)
        except OSError as e:
            if _no_space(e):
                need = self.tmp.stat().st_size + sum(p.stat().st_size for _, p in _part_files(self.tmp))
                raise InputError(self._full(e, f"the merge into {self.path}", need)) from None
            raise
        self.lock.unlink(missing_ok=True)
        return path

    def _full(self, e: OSError, what: str, need: int) -> str:
        """The one line for a full file system while writing ``what`` (about ``need`` bytes)."""
        folder = self.parts if self.parts.exists() else self.path.parent
        try:
            st = os.statvfs(folder)
            free = f", {st.f_bavail * st.f_frsize} bytes free"
        except OSError:
            free = ""
        quota = "quota exceeded" if getattr(e, "errno", None) == errno.EDQUOT or "quota" in str(e).lower() \
            else "no space left"
        return (f"output {self.path}: the file system at {_mount_point(folder)} is full ({quota}) while writing "
                f"{what}: it needs about {need} bytes{free}; the {self.written} finished case(s) are kept: "
                f"free space, then hpcattn recover {self.tmp}")


def _no_space(e: BaseException) -> bool:
    """A full file system or quota (h5py words it in its message, the errno may be missing)."""
    if not isinstance(e, OSError):
        return False
    text = str(e).lower()
    return e.errno in (errno.ENOSPC, errno.EDQUOT) or "no space left on device" in text \
        or "disk quota exceeded" in text


def _mount_point(folder: Path) -> Path:
    """The mount point of the file system holding ``folder``."""
    p = Path(os.path.abspath(folder))
    while not os.path.ismount(p) and p != p.parent:
        p = p.parent
    return p


# -- the record lock ---------------------------------------------------------------------------
#
# ``NAME.tmp.lock`` (JSON: host, pid, started_utc) exists from the writer's start to its close.
# It is created with O_CREAT|O_EXCL, so of two runs writing the same NAME the second is refused
# before it touches anything; a run that dies leaves it behind, and the next run to NAME is told
# to ``hpcattn recover NAME.tmp`` (which removes it).


def lock_path(tmp: Path) -> Path:
    """The lock file of ``NAME.tmp`` (``NAME.tmp.lock``)."""
    return tmp.with_name(tmp.name + ".lock")


def check_output_path(path: str) -> None:
    """Raise InputError when ``path`` cannot become the record: an existing directory, a parent
    that is a file, a folder that is not writable. Missing folders are fine (created)."""
    p = Path(path)
    if p.is_dir():
        raise InputError(f"output {path} is an existing directory; give a file name (e.g. {p / 'run.h5'})")
    parent = p.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise InputError(f"output {path}: {parent} is a file, not a directory")
    probe = parent / f".{p.name}.probe-{os.getpid()}"
    try:                                           # the one sure test: create a file there
        os.close(os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
        probe.unlink()
    except OSError as e:
        reason = "read-only file system" if _read_only(parent) else _os_reason(e)
        raise InputError(f"output {path}: cannot write in {parent} ({reason})") from None
    tmp = p.with_name(p.name + ".tmp")
    if lock_path(tmp).exists():                    # early word; take_lock decides race-free
        raise InputError(_leftover_message(tmp, _lock_owner(lock_path(tmp))))
    if tmp.exists() or parts_dir(tmp).exists():
        raise InputError(_leftover_message(tmp, None))


# names of the files a run writes beside NAME (and recover/merge): an output named like one of them
# would be written over by another run's NAME, or write over it
WORK_SUFFIXES = (".tmp", ".tmp.d", ".lock", ".merging", ".unmerged")


def check_output_collision(path: str, reads: list[tuple[str, str]],
                           read_dirs: list[tuple[str, str]] = ()) -> None:
    """Raise InputError (one line naming both paths) when the record ``path`` or a file the run
    writes beside it (``NAME.tmp``, ``NAME.tmp.lock``) is a file the run reads, or when ``path`` is
    named like another record's work file.

    ``reads`` lists (what the file is, e.g. ``"inputs.path"``, its path); ``read_dirs`` lists
    (key, directory whose files the run reads: ``model.path``, any file in it).
    Nothing is written: call it before anything touches the file system."""
    p = Path(path)
    for suffix in WORK_SUFFIXES:
        if p.name.endswith(suffix) and len(p.name) > len(suffix):
            owner = p.name[: -len(suffix)]
            if suffix == ".lock" and owner.endswith(".tmp"):
                owner = owner[: -len(".tmp")]
            raise InputError(f"output {path}: a name ending in {suffix} is what a run writing "
                             f"{p.with_name(owner)} uses for its own work files; give another name "
                             f"(names ending in {', '.join(WORK_SUFFIXES)} are refused)")
    tmp = p.with_name(p.name + ".tmp")
    written = {"the record": p, "its work file": tmp, "its lock": lock_path(tmp)}

    def same(a: Path, b: Path) -> bool:
        try:
            if a.exists() and b.exists():
                return os.path.samefile(a, b)
        except OSError:
            pass
        return os.path.abspath(a) == os.path.abspath(b)

    for what, read in reads:
        if not read or not Path(read).is_file():       # (a missing input is reported on its own)
            continue
        for role, w in written.items():
            if same(w, Path(read)):
                where = "" if role == "the record" else f" ({role} {w})"
                raise InputError(f"output {path}{where} is {what} {read}, which this run reads; "
                                 f"give -o another file (nothing was written)")
    for what, folder in read_dirs:
        if not folder or not Path(folder).is_dir():
            continue
        for role, w in written.items():
            if w.is_file() and same(w.parent, Path(folder)):
                where = "" if role == "the record" else f" ({role} {w})"
                raise InputError(f"output {path}{where} is a file of {what} {folder}, which this run reads; "
                                 f"give -o a file outside it (nothing was written)")


def _read_only(folder: Path) -> bool:
    try:
        return bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def _os_reason(e: OSError) -> str:
    return os.strerror(e.errno) if e.errno else str(e)


def take_lock(tmp: Path) -> Path:
    """Create ``NAME.tmp.lock`` exclusively, or raise InputError naming its owner."""
    lock = lock_path(tmp)
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        raise InputError(_leftover_message(tmp, _lock_owner(lock))) from None
    with os.fdopen(fd, "w") as fh:
        json.dump({"host": socket.gethostname(), "pid": os.getpid(),
                   "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}, fh)
        fh.flush()
        os.fsync(fh.fileno())
    return lock


def _lock_owner(lock: Path) -> dict:
    """The lock's content; ``{}`` when unreadable (a run that died while taking it)."""
    try:
        info = json.loads(lock.read_text())
        return info if isinstance(info, dict) else {}
    except (OSError, ValueError):
        return {}


def _owner_state(info: dict) -> str:
    """"alive", "dead" or "unknown" (another host, or an unreadable lock)."""
    if not info or info.get("host") != socket.gethostname() or not isinstance(info.get("pid"), int):
        return "unknown"
    try:
        os.kill(info["pid"], 0)
    except ProcessLookupError:
        return "dead"
    except PermissionError:
        pass                                       # another user's process
    try:                                           # a zombie (exited, not yet reaped) is dead
        if Path(f"/proc/{info['pid']}/stat").read_text().rsplit(")", 1)[1].split()[0] in "ZX":
            return "dead"
    except (OSError, IndexError):
        pass
    return "alive"


def _leftover_message(tmp: Path, owner: dict | None) -> str:
    """Why a run cannot write ``NAME``: a live writer, a dead one's unfinished record, or one
    whose state cannot be told. ``owner``: the lock's content (None: no lock, only ``NAME.tmp``)."""
    name = tmp.with_suffix("")
    lock = lock_path(tmp)
    who = f"pid {owner.get('pid')} on {owner.get('host')}, started {owner.get('started_utc')}" if owner else ""
    state = _owner_state(owner) if owner is not None else "dead"
    if state == "alive":
        return (f"output {name} is being written by another run ({who}; lock {lock}); "
                f"use another -o, or wait for that run to finish")
    n = len(_part_files(tmp))
    keep = (f"`hpcattn recover {tmp}` merges its {n} finished case(s) into {name} (or delete {tmp}, "
            f"{parts_dir(tmp)}/ and {lock} to discard them)")
    if state == "dead":
        what = f"a run that died ({who})" if owner else "an earlier run that did not finish"
        return f"output {name}: {what} left an unfinished record {tmp}; {keep}"
    if not owner:
        return f"output {name}: lock {lock} exists but is unreadable (a run that died while starting?); {keep}"
    return (f"output {name} is locked by {who}; from {socket.gethostname()} hpcattn cannot tell whether that "
            f"run is still going. If it is not: {keep}")


def unmerged_dir(path: Path) -> Path:
    """Where :func:`_finish` keeps the case files it could not read (``NAME.unmerged/``)."""
    return path.with_name(path.name + ".unmerged")


def _readable(part: Path) -> bool:
    """Whether every dataset of case file ``part`` reads back (after a failed merge copy: a bad
    case file is skipped, a failure to write the merged record is raised)."""
    try:
        with h5py.File(part, "r", locking=False) as src:
            src["case"].visititems(lambda name, obj: obj[()] if isinstance(obj, h5py.Dataset) else None)
        return True
    except UNREADABLE:
        return False


def _finish(tmp: Path, path: Path, status: str) -> Path:
    """Merge ``tmp`` and its case files into ``path`` with ``status``; drop ``tmp`` and the folder.

    The merge goes to a copy (``path.merging``) renamed over ``path`` when whole, so ``tmp`` and
    its case files stay intact until then: a kill or a write error during the merge (a full disk)
    loses nothing and leaves no ``path.merging``, and repeating it (``recover``) starts again from
    the same files. A case file that cannot be read (truncated or corrupt) is left out with a
    warning naming it and moved to ``NAME.unmerged/``; the record is then ``incomplete``."""
    merging = path.with_name(path.name + ".merging")
    bad = []
    try:
        shutil.copyfile(tmp, merging)
        with h5py.File(merging, "a") as f:
            for cid, part in _part_files(tmp):
                try:
                    with h5py.File(part, "r", locking=False) as src:
                        src.copy(src["case"], f["cases"], name=cid)
                except UNREADABLE as e:
                    if cid in f["cases"]:
                        del f["cases"][cid]                # a half-copied group
                    if _readable(part):                    # the case file is whole: writing failed
                        raise
                    bad.append(part)
                    print(f"hpcattn: warning: {part}: unreadable case file, truncated or corrupt "
                          f"({type(e).__name__}: {e}); not merged, kept in {unmerged_dir(path)}/",
                          file=sys.stderr)
            f.attrs["status"] = "incomplete" if bad else status
        os.replace(merging, path)
    except BaseException:
        merging.unlink(missing_ok=True)
        raise
    if bad:
        keep = unmerged_dir(path)
        keep.mkdir(exist_ok=True)
        for part in bad:
            os.replace(part, keep / part.name)
    tmp.unlink()
    shutil.rmtree(parts_dir(tmp), ignore_errors=True)
    return path


def recover(tmp: str, output: str | None = None) -> Path:
    """Turn a crashed run's ``NAME.tmp`` (+ ``NAME.tmp.d/``) into one file, ``status = "incomplete"``.

    ``output`` defaults to NAME (the ``.tmp`` suffix dropped). Raises InputError for anything else."""
    t = Path(tmp)
    if t.suffix != ".tmp" or not t.is_file():
        raise InputError(f"{tmp}: expected the NAME.tmp file of an unfinished run")
    meta, _ = read_cases(tmp, warn=False)          # validates that it is a record (_finish warns)
    if meta.get("status") != "running":
        raise InputError(f"{tmp}: status is {meta.get('status')!r}, not 'running'")
    lock = lock_path(t)
    owner = _lock_owner(lock) if lock.exists() else None
    if owner and owner.get("pid") != os.getpid() and _owner_state(owner) == "alive":
        raise InputError(f"{tmp}: its run is still going (pid {owner['pid']} on {owner['host']}, started "
                         f"{owner.get('started_utc')}; lock {lock}); recover it once that run has ended")
    path = _finish(t, Path(output) if output else t.with_suffix(""), "incomplete")
    lock.unlink(missing_ok=True)
    return path


def read_cases(path: str, datasets: tuple[str, ...] = (), warn: bool = True) -> tuple[dict, list[dict]]:
    """Read a record: (root attrs, [case summary dict per case, with 'id' and 'file']).

    ``datasets``: also read these datasets of each case (the ones it has, e.g. ``time_s``,
    ``phase_s``) into ``row["datasets"]`` as name -> (array, attrs), the form ``write_case`` takes.
    Raises hpcattn.errors.InputError for a file that is not an hpcattn record, or one that is
    truncated or corrupt (naming the file). A ``NAME.tmp``'s case file (``NAME.tmp.d/*.h5``) that
    cannot be read is skipped with a warning naming it on stderr (``warn``), and listed in
    ``meta["unreadable_case_files"]``: the other finished cases of a crashed run stay readable.
    """
    if Path(path).is_dir():
        raise InputError(f"{path}: is a directory; give record files (e.g. {Path(path) / '*.h5'})")
    if not Path(path).exists():
        raise InputError(f"{path}: cannot open: no such file")
    try:
        f = h5py.File(path, "r", locking=False)   # readers never lock (crashed writers, Lustre)
    except (OSError, FileNotFoundError) as e:     # (HDF5's message spans lines: one line here)
        raise InputError(f"{path}: cannot open as HDF5 ({' '.join(str(e).split())})") from None
    try:
        with f:
            if "cases" not in f and _decode(f.attrs.get("kind", "")) == PROJECTION_KIND:
                raise ProjectionFile(f"{path}: a projection file (hpcattn project -o, "
                                     f"{_decode(f.attrs.get('hosts', '?'))} hosts), not a run record")
            if "cases" not in f or "schema_version" not in f.attrs:
                raise InputError(f"{path}: not an hpcattn record (no /cases group)")
            meta = {k: _decode(v) for k, v in f.attrs.items()}
            rows = [_row(cid, g, path, datasets) for cid, g in f["cases"].items()]
    except UNREADABLE as e:
        raise InputError(f"{path}: unreadable hpcattn record, truncated or corrupt "
                         f"({type(e).__name__}: {e})") from None
    bad = []
    for cid, part in _part_files(Path(path)):      # an unfinished run's cases (NAME.tmp.d/)
        try:
            with h5py.File(part, "r", locking=False) as src:
                rows.append(_row(cid, src["case"], path, datasets))
        except UNREADABLE as e:
            bad.append(str(part))
            if warn:
                print(f"hpcattn: warning: {part}: unreadable case file, truncated or corrupt "
                      f"({type(e).__name__}: {e}); skipped", file=sys.stderr)
    if bad:
        meta["unreadable_case_files"] = bad
    return meta, rows


def read_hosts(path: str) -> dict[str, list]:
    """The record's ``/meta/hosts``: field (rank, hostname, gpu_name, ...) -> one value per rank."""
    read_cases(path, warn=False)                   # validates that it is a record
    try:
        with h5py.File(path, "r", locking=False) as f:
            return {k: [_decode(x) for x in ds[()]] for k, ds in f["meta/hosts"].items()}
    except UNREADABLE as e:
        raise InputError(f"{path}: unreadable /meta/hosts ({type(e).__name__}: {e})") from None


def _row(cid: str, g, path: str, datasets: tuple[str, ...] = ()) -> dict:
    row = {k: _decode(v) for k, v in g.attrs.items()}
    row["id"] = cid
    row["file"] = str(path)
    if datasets:
        row["datasets"] = {n: (g[n][()], {k: _decode(v) for k, v in g[n].attrs.items()})
                           for n in datasets if n in g}
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
