"""What the launcher (srun, mpirun, mpiexec) knows and MPI does not, and the reverse.

:func:`refuse_split_launch`: catch a launch that split one job into many 1-rank MPI worlds.
:func:`note_abort`: leave ``MPI_Abort``'s code where a job script finds it (srun reports only 137).

``srun`` without the right ``--mpi=`` plug-in (a stock Slurm has ``MpiDefault=none``), or an
``mpirun`` of another MPI than the one mpi4py is linked to, starts N processes that each come up
as rank 0 of a world of size 1. Each would run the whole job alone and write the same output
file. :func:`refuse_split_launch` detects that from the launcher's variables and refuses, with
one error line (from the launcher's task 0 only) and exit status 2 on every process. It needs no
communication: with a world of size 1 there is nobody to wait for, so it cannot hang.
"""

from __future__ import annotations

import os
import sys

# (variable with the launcher's task count, variable with this process's task index, launcher)
LAUNCHER_VARS = (
    ("SLURM_STEP_NUM_TASKS", "SLURM_PROCID", "srun"),       # set by srun in every task, not in the batch step
    ("OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK", "Open MPI mpirun"),
    ("PMI_SIZE", "PMI_RANK", "a PMI launcher (MPICH/Intel MPI mpiexec)"),
    ("MV2_COMM_WORLD_SIZE", "MV2_COMM_WORLD_RANK", "MVAPICH mpirun_rsh"),
)


def launcher_tasks(environ=os.environ) -> tuple[int, int, str, str] | None:
    """The first launcher variable that says more than one task: ``(tasks, task index, variable,
    launcher)``; None when no launcher says so (a plain ``python``, or a 1-task launch)."""
    for size_var, rank_var, who in LAUNCHER_VARS:
        try:
            n = int(environ.get(size_var, ""))
        except ValueError:
            continue
        if n > 1:
            try:
                task = int(environ.get(rank_var, "0"))
            except ValueError:
                task = 0
            return n, task, size_var, who
    return None


def split_launch_message(world_size: int, environ=os.environ) -> str | None:
    """The error for a launch of several tasks that came up as MPI worlds of ``world_size`` == 1,
    or None when the launch is fine (world larger than 1, or no multi-task launcher)."""
    found = launcher_tasks(environ) if world_size == 1 else None
    if found is None:
        return None
    n, _, var, who = found
    hint = ("under srun pass the PMI plug-in that matches mpi4py's MPI: --mpi=pmi2 for the mpich wheel "
            "of `make setup`, pmix for Open MPI/PMIx builds (`srun --mpi=list`; the templates take "
            "HPCATTN_SRUN_MPI)" if var == "SLURM_STEP_NUM_TASKS" else
            "launch with the mpiexec/mpirun of the MPI that mpi4py is linked to "
            "(python -c 'from mpi4py import MPI; print(MPI.Get_library_version())')")
    return (f"launched as {n} tasks by {who} ({var}={n}) but MPI_COMM_WORLD has 1 rank: the tasks did "
            f"not join one MPI world, so each would run the whole job alone and race on one output "
            f"file; {hint} (docs/cluster.md)")


def refuse_split_launch(world_size: int, environ=os.environ) -> bool:
    """True when this process must stop (see :func:`split_launch_message`): then the error line has
    been printed, by the launcher's task 0 only, and the caller returns exit status 2."""
    msg = split_launch_message(world_size, environ)
    if msg is None:
        return False
    if launcher_tasks(environ)[1] == 0:
        print(f"hpcattn: error: {msg}", file=sys.stderr, flush=True)
    return True


# ------------------------------------------------------------------------------------------------
# the abort code, past a launcher that reports only the kill

ABORT_FILE_VAR = "HPCATTN_ABORT_FILE"


def note_abort(code: int, environ=os.environ) -> None:
    """Before ``MPI_Abort(code)``: write ``code`` to ``$HPCATTN_ABORT_FILE`` when it is set (the first
    rank to get there wins; never raises).

    srun does not pass ``MPI_Abort``'s code on: Slurm kills every task of the step and srun exits
    137 whatever the code. The templates (slurm/job_env.sh) set the variable and exit with the
    code found in the file, so a job's exit status is hpcattn's (1 crash, 2, 4 watchdog) there too.
    """
    path = environ.get(ABORT_FILE_VAR)
    if not path:
        return
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except OSError:
        return
    with os.fdopen(fd, "w") as f:
        f.write(f"{int(code)}\n")
