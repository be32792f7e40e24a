"""Launch helpers for tests that start real MPI ranks on CPU."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def mpiexec() -> list[str]:
    """The launcher: $HPCATTN_MPIEXEC, the one beside this python (mpich wheel), or on PATH."""
    exe = os.environ.get("HPCATTN_MPIEXEC") or shutil.which("mpiexec", path=str(Path(sys.executable).parent)) \
        or shutil.which("mpiexec") or shutil.which("mpirun")
    if exe is None:
        raise RuntimeError("no mpiexec found (install the mpich extra or set HPCATTN_MPIEXEC)")
    cmd = [exe]
    if is_open_mpi(exe):
        cmd += ["--oversubscribe"] + (["--allow-run-as-root"] if os.geteuid() == 0 else [])
    return cmd


def is_open_mpi(exe: str) -> bool:
    version = subprocess.run([exe, "--version"], capture_output=True, text=True).stdout
    return "Open MPI" in version or "OpenRTE" in version


def run_ranks(n: int, args: list[str], timeout: float = 180, env: dict | None = None,
              cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """``mpiexec -n n python ARGS`` with the test's interpreter; returns the completed process."""
    e = dict(os.environ)
    e["PYTHONPATH"] = str(ROOT) + os.pathsep + e.get("PYTHONPATH", "")
    e.setdefault("OMP_NUM_THREADS", "1")
    e |= env or {}
    cmd = mpiexec()
    if is_open_mpi(cmd[0]):        # Open MPI forwards only the variables named with -x
        names = {"PYTHONPATH", "OMP_NUM_THREADS", "PATH", "LD_LIBRARY_PATH", *(env or {})}
        names |= {k for k in e if k.startswith(("NCCL_", "TORCH_", "HPCATTN_", "CUDA_", "NVSHMEM_"))}
        cmd += [x for k in sorted(names) if k in e for x in ("-x", k)]
    return subprocess.run(cmd + ["-n", str(n), sys.executable, *args], capture_output=True, text=True,
                          timeout=timeout, env=e, cwd=cwd)
