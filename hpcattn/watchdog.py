"""A per-rank hang watchdog, so that a hung collective never burns the rest of an allocation.

``start(timeout_s, rank)`` once per process (again to change the timeout), then ``arm(label)`` when a bounded piece of work
begins (set-up, each case) and ``disarm()`` when the run is done. If one armed piece runs longer
than ``timeout_s`` (``run.case_timeout_s``), the rank prints one line naming the piece and the
key, dumps the Python stacks of all its threads (where it hangs), and aborts the whole MPI job
(``MPI_Abort``, so ``mpirun``/``srun`` end every rank). ``hpcattn run`` arms it before its first
collective, while rank 0 resolves the config and reads the input files, with the timeout of
``$HPCATTN_SETUP_TIMEOUT_S`` (:func:`setup_timeout`: the config is not known yet), then with
``run.case_timeout_s`` from the set-up on. Cases finished before are kept
(``NAME.tmp.d/``; see docs/hdf5.md). Every rank arms the same timeout at the same points, so a
rank blocked in a collective by a hung peer fires too if the launcher has not ended it first.

``catch_interrupt(world)`` does the same for Ctrl-C (SIGINT, which mpiexec and srun forward to
every rank): rank 0 prints one ``hpcattn: interrupted`` line and ends the job with status 130,
even while ranks are blocked inside an MPI call (where Python never sees a KeyboardInterrupt).
Both end the job through :func:`abort_job`, the one abort path (it also leaves the code in
``$HPCATTN_ABORT_FILE`` for the Slurm templates, where srun itself reports 137).

Every message goes out in one ``write(2)`` ending in a newline (:func:`say`): the launchers
forward each rank's output in the pieces it was written in, and ``print`` writes the text and
its newline separately, so lines of different ranks ran together.
"""

from __future__ import annotations

import faulthandler
import os
import signal
import sys
import tempfile
import threading
import time

from hpcattn.launch import note_abort

EXIT_CODE = 4
SETUP_ENV = "HPCATTN_SETUP_TIMEOUT_S"     # the watchdog's timeout before the config is known
SETUP_DEFAULT_S = 3600.0                  # the default of run.case_timeout_s

_state = {"timeout": None, "rank": 0, "deadline": None, "label": "", "thread": None, "key": "run.case_timeout_s"}


def setup_timeout() -> float:
    """The watchdog's timeout while the config is resolved: ``$HPCATTN_SETUP_TIMEOUT_S`` seconds
    (default 3600, as ``run.case_timeout_s``). Raises ValueError with the one line for a bad value."""
    raw = os.environ.get(SETUP_ENV, "").strip()
    if not raw:
        return SETUP_DEFAULT_S
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise ValueError(f"{SETUP_ENV}={raw!r}: expected a number of seconds > 0")
    return value
_cv = threading.Condition()


def start(timeout_s: float | None, rank: int, key: str = "run.case_timeout_s") -> None:
    """Start the watchdog thread, or set the timeout of the running one (``timeout_s`` None or
    <= 0: off; a pending deadline is cleared then). ``key`` is what sets the timeout (the line
    names it)."""
    with _cv:
        _state["timeout"], _state["rank"] = (timeout_s if timeout_s and timeout_s > 0 else None), rank
        _state["key"] = key
        if _state["timeout"] is None:
            _state["deadline"] = None
            _cv.notify()
        if _state["timeout"] is None or _state["thread"] is not None:
            return
        t = threading.Thread(target=_loop, name="hpcattn-watchdog", daemon=True)
        _state["thread"] = t
    t.start()


def arm(label: str) -> None:
    """(Re)start the clock for ``label`` (e.g. a case id)."""
    with _cv:
        if _state["timeout"] is not None:
            _state["deadline"], _state["label"] = time.monotonic() + _state["timeout"], label
            _cv.notify()


def disarm() -> None:
    with _cv:
        _state["deadline"] = None
        _cv.notify()


def _loop() -> None:
    with _cv:
        while True:
            if _state["deadline"] is None:
                _cv.wait()
                continue
            left = _state["deadline"] - time.monotonic()
            if left <= 0:
                break
            _cv.wait(left)
        label, timeout, rank, key = _state["label"], _state["timeout"], _state["rank"], _state["key"]
    _fire(label, timeout, rank, key)


def _fire(label: str, timeout: float, rank: int, key: str = "run.case_timeout_s") -> None:
    """The hang report: the line and this rank's stacks in one write, then end the job."""
    say(f"hpcattn: error (rank {rank}): {label} ran longer than {key} = {timeout:g} s "
        f"(a hang?); this rank's Python stacks follow; aborting all ranks\n" + _stacks())
    abort_job(_world_from_thread(), EXIT_CODE)
    os._exit(EXIT_CODE)                      # should MPI_Abort ever return


def _stacks() -> str:
    """The Python stacks of all this process's threads (faulthandler's dump, as text)."""
    with tempfile.TemporaryFile(mode="w+") as fh:
        faulthandler.dump_traceback(file=fh, all_threads=True)
        fh.seek(0)
        return fh.read()


def _world_from_thread():
    """COMM_WORLD when MPI_Abort may be called from a side thread (MPI_THREAD_MULTIPLE), else None."""
    from mpi4py import MPI

    if MPI.Is_initialized() and not MPI.Is_finalized() and MPI.Query_thread() == MPI.THREAD_MULTIPLE:
        return MPI.COMM_WORLD
    return None


def say(text: str) -> None:
    """Write ``text`` (one or more lines) to stderr in one ``write(2)``, ending with a newline."""
    sys.stderr.flush()
    data = (text if text.endswith("\n") else text + "\n").encode(errors="replace")
    while data:
        data = data[os.write(2, data):]


# ------------------------------------------------------------------------------------------------
# Ctrl-C

INTERRUPT_CODE = 130
_interrupt = {"prev": None, "fd": None, "thread": None, "note": None}


def catch_interrupt(rank: int, note=lambda: "") -> None:
    """From now on SIGINT ends the whole job: rank 0 prints ``hpcattn: interrupted`` (plus
    ``note()``, e.g. where the finished cases are) and ends the job with :func:`abort_job` (130:
    ``MPI_Abort``, or ``os._exit`` in a 1-rank world); the other ranks
    wait for that abort (and exit 130 on their own after ``HPCATTN_INTERRUPT_WAIT_S``, default
    10 s, should rank 0 not get the signal). A watcher thread does it, woken through
    :func:`signal.set_wakeup_fd`, so a rank blocked in an MPI call still reacts.
    :func:`release_interrupt` restores the previous handler (for in-process callers)."""
    if _interrupt["thread"] is not None or threading.current_thread() is not threading.main_thread():
        return
    rfd, wfd = os.pipe()
    os.set_blocking(wfd, False)
    _interrupt["prev"] = signal.signal(signal.SIGINT, lambda signum, frame: None)
    _interrupt["old_fd"] = signal.set_wakeup_fd(wfd, warn_on_full_buffer=False)
    _interrupt.update(fd=(rfd, wfd), note=note)
    t = threading.Thread(target=_on_interrupt, args=(rfd, rank), name="hpcattn-interrupt", daemon=True)
    _interrupt["thread"] = t
    t.start()


def release_interrupt() -> None:
    """Undo :func:`catch_interrupt` (the watcher thread ends)."""
    if _interrupt["thread"] is None:
        return
    signal.set_wakeup_fd(_interrupt.pop("old_fd", -1))
    signal.signal(signal.SIGINT, _interrupt["prev"])
    rfd, wfd = _interrupt["fd"]
    os.write(wfd, b"\0")                    # not a signal number: the watcher returns
    _interrupt["thread"].join(5)
    for fd in (rfd, wfd):
        os.close(fd)
    _interrupt.update(prev=None, fd=None, thread=None, note=None)


def _on_interrupt(rfd: int, rank: int) -> None:
    while True:
        got = os.read(rfd, 1)
        if not got or got == b"\0":
            return
        if got[0] == signal.SIGINT:
            break
    if rank == 0:
        try:
            note = _interrupt["note"]() if _interrupt["note"] else ""
        except Exception:                  # noqa: BLE001 (the line must come out)
            note = ""
        say("hpcattn: interrupted" + (f"; {note}" if note else ""))
        world = _world_from_thread()
        if world is not None and world.Get_size() == 1:    # one process: no launcher to tell
            world = None
        abort_job(world, INTERRUPT_CODE)     # the one abort path (the code reaches srun's job script too)
        os._exit(INTERRUPT_CODE)             # should MPI_Abort ever return
    time.sleep(float(os.environ.get("HPCATTN_INTERRUPT_WAIT_S", "10")))
    os._exit(INTERRUPT_CODE)


def abort_job(world, code: int) -> None:
    """Flush, give the launcher's output forwarder a moment, then ``MPI_Abort`` (``os._exit`` when
    ``world`` is None).

    Hydra (MPICH) and ORTE (Open MPI) forward rank output asynchronously and drop what is still in
    flight when an abort kills the job; without the pause the one line that says why is often lost.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    time.sleep(float(os.environ.get("HPCATTN_ABORT_GRACE_S", "1.0")))
    if world is None:
        os._exit(code)
    note_abort(code)                         # srun reports 137 for any abort: the job script reads this
    world.Abort(code)
