"""A per-rank hang watchdog, so that a hung collective never burns the rest of an allocation.

``start(timeout_s, rank)`` once per process, then ``arm(label)`` when a bounded piece of work
begins (set-up, each case) and ``disarm()`` when the run is done. If one armed piece runs longer
than ``timeout_s`` (``run.case_timeout_s``), the rank prints one line naming the piece and the
key, dumps the Python stacks of all its threads (where it hangs), and aborts the whole MPI job
(``MPI_Abort``, so ``mpirun``/``srun`` end every rank). Cases finished before are kept
(``NAME.tmp.d/``; see docs/hdf5.md). Every rank arms the same timeout at the same points, so a
rank blocked in a collective by a hung peer fires too if the launcher has not ended it first.
"""

from __future__ import annotations

import faulthandler
import os
import sys
import threading
import time

EXIT_CODE = 4

_state = {"timeout": None, "rank": 0, "deadline": None, "label": "", "thread": None}
_cv = threading.Condition()


def start(timeout_s: float | None, rank: int) -> None:
    """Start the watchdog thread (no-op for ``timeout_s`` None or <= 0, or when already started)."""
    with _cv:
        _state["timeout"], _state["rank"] = (timeout_s if timeout_s and timeout_s > 0 else None), rank
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
        label, timeout, rank = _state["label"], _state["timeout"], _state["rank"]
    print(f"hpcattn: error (rank {rank}): {label} ran longer than run.case_timeout_s = {timeout:g} s "
          f"(a hang?); this rank's Python stacks follow; aborting all ranks", file=sys.stderr, flush=True)
    faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
    world = None                            # MPI_Abort from this thread needs MPI_THREAD_MULTIPLE
    from mpi4py import MPI

    if MPI.Is_initialized() and MPI.Query_thread() == MPI.THREAD_MULTIPLE:
        world = MPI.COMM_WORLD
    abort_job(world, EXIT_CODE)
    os._exit(EXIT_CODE)                      # should MPI_Abort ever return


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
    world.Abort(code)
