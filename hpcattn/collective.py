"""The MPI error policy of hpcattn's commands: any rank's failure becomes one line on every rank,
never a rank left waiting in a collective.

* :func:`collective_check` runs a step on every rank, :func:`root_check` on rank 0 alone; an
  exception anywhere is raised on every rank as :class:`Collective` (rank 0 prints it, every rank
  exits 2);
* :func:`reading` and :func:`unexpected` turn an unexpected exception while reading an input into
  one line naming the input and the exception (``--debug``: :func:`message` prints the traceback);
* :func:`abort_on_error` runs an MPI command: any other exception on any rank aborts every rank
  (``MPI_Abort``), as ``python -m mpi4py`` does.

Used by ``hpcattn run`` (:mod:`hpcattn.jobs.orchestrate`) and ``hpcattn check-comm``. Every error
and its status: docs/errors.md.
"""

from __future__ import annotations

import contextlib
import traceback

from hpcattn import watchdog
from hpcattn.errors import HpcattnError


@contextlib.contextmanager
def reading(what: str):
    """Turn an unexpected exception while reading ``what`` (a file, the model) into an
    HpcattnError naming it and the exception (the original stays as ``__cause__``)."""
    try:
        yield
    except HpcattnError:
        raise
    except Exception as e:
        raise HpcattnError(unexpected(what, e)) from e


def unexpected(what: str, e: BaseException) -> str:
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{what}: unexpected {type(e).__name__}{': ' + first if first else ''} (--debug shows the traceback)"


def message(e: Exception, where: str, debug: bool) -> str:
    """The one line for ``e``; with ``debug`` this rank first prints the traceback."""
    if debug:
        watchdog.say("".join(traceback.format_exception(e)))
    return str(e) if isinstance(e, HpcattnError) else unexpected(where, e)


def collective_check(world, fn, where: str = "set-up", debug: bool = False):
    """Run ``fn()`` on every rank; if it raises anywhere, raise the first rank's message on all
    (:class:`Collective`). A non-HpcattnError becomes ``WHERE: unexpected TYPE: MESSAGE``."""
    err = None
    try:
        value = fn()
    except Exception as e:      # noqa: BLE001 (every rank must learn of it, or the others hang)
        err, value = message(e, where, debug), None
    errs = [e for e in world.allgather(err) if e]
    if errs:
        raise Collective(errs[0])
    return value


def root_check(world, fn, where: str, debug: bool = False):
    """Run ``fn()`` on rank 0 only and broadcast its value; an exception there is raised on every
    rank as :class:`Collective`, as in :func:`collective_check`."""
    err = value = None
    if world.Get_rank() == 0:
        try:
            value = fn()
        except Exception as e:  # noqa: BLE001
            err = message(e, where, debug)
    err, value = world.bcast((err, value), root=0)
    if err:
        raise Collective(err)
    return value


class Collective(HpcattnError):
    """An error every rank knows about: rank 0 prints it, every rank exits 2."""


def abort_on_error(fn) -> int:
    """Run an MPI command; any exception on any rank aborts every rank (never a hang).

    An error that every rank raised together (:class:`Collective`) is printed once by rank 0 and
    every rank returns 2. Any other :class:`HpcattnError` prints one line from the failing rank,
    any other exception its traceback; then ``MPI_Abort`` ends the whole job.
    """
    from mpi4py import MPI

    world = MPI.COMM_WORLD
    rank = world.Get_rank()
    try:
        return fn()
    except Collective as e:
        if rank == 0:
            watchdog.say(f"hpcattn: error: {e}")
        return 2
    except HpcattnError as e:
        watchdog.say(f"hpcattn: error{f' (rank {rank})' if rank else ''}: {e}")
        watchdog.abort_job(world, 2)
    except BaseException:
        watchdog.say(f"hpcattn: rank {rank} failed; aborting all ranks\n" + traceback.format_exc())
        watchdog.abort_job(world, 1)
    return 1
