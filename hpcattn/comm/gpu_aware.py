"""Is the MPI library CUDA-aware? A best-effort probe plus the user's override.

Every probe has documented false answers (spec hpc_conventions.md section 3), so ``auto``
resolves to False unless a probe says yes. A device pointer handed to a non-CUDA-aware MPI
segfaults (uncatchably), so False is the safe answer. The decision and the method that produced
it go into the HDF5 metadata.

The decision logic, :func:`decide`, is a pure function of the probe results so that it can be
unit-tested for Open MPI and MPICH without either library's CUDA build.
"""

from __future__ import annotations

import ctypes
import os

ENV_HINTS = {  # variable: value meaning "device buffers enabled" (heuristic only)
    "MPICH_GPU_SUPPORT_ENABLED": "1",      # Cray MPICH
    "MV2_USE_CUDA": "1",                   # MVAPICH2-GDR
    "PSP_CUDA": "1",                       # ParaStation MPI
}


def decide(alloc_kinds: str | None, mpix_cuda: int | None, env: dict[str, str]) -> tuple[bool | None, str]:
    """Combine probe results into (cuda_aware or None for unknown, method).

    Args:
        alloc_kinds: the ``mpi_memory_alloc_kinds`` info value (MPI 4.1), or None if absent.
        mpix_cuda: result of ``MPIX_Query_cuda_support()`` (Open MPI) or of
            ``MPIX_GPU_query_support(CUDA)`` (MPICH): 1, 0, or None if the symbol is missing.
        env: the environment.
    """
    if alloc_kinds is not None and "cuda" in alloc_kinds.lower():
        return True, "mpi_memory_alloc_kinds"
    if mpix_cuda is not None:
        return bool(mpix_cuda), "MPIX_query"
    for var, val in ENV_HINTS.items():
        if env.get(var) == val:
            return True, f"env:{var}"
    if alloc_kinds is not None:
        return False, "mpi_memory_alloc_kinds"
    return None, "unknown"


def resolve(setting: str, probed: tuple[bool | None, str]) -> tuple[bool, str]:
    """Apply the config ``comm.gpu_aware_mpi`` (auto|true|false) to a probe result."""
    if setting == "true":
        return True, "config"
    if setting == "false":
        return False, "config"
    value, method = probed
    return bool(value), method if value is not None else "unknown->false"


def _loaded_libmpi() -> str | None:
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                path = line.split()[-1] if len(line.split()) >= 6 else ""
                name = os.path.basename(path)
                if name.startswith(("libmpi.so", "libmpich.so", "libmpi_cray")):
                    return path
    except OSError:
        pass
    return None


def _query_mpix() -> int | None:
    path = _loaded_libmpi()
    if path is None:
        return None
    try:
        lib = ctypes.CDLL(path)
    except OSError:
        return None
    if hasattr(lib, "MPIX_Query_cuda_support") and "mpich" not in path:
        lib.MPIX_Query_cuda_support.restype = ctypes.c_int
        return int(lib.MPIX_Query_cuda_support())
    if hasattr(lib, "MPIX_GPU_query_support"):
        flag = ctypes.c_int(0)
        if lib.MPIX_GPU_query_support(0, ctypes.byref(flag)) == 0:  # 0 = MPIX_GPU_SUPPORT_CUDA
            return int(flag.value)
    return None


def probe(mpi_comm) -> tuple[bool | None, str]:
    """Probe the running MPI library (after MPI init). Never touches device memory."""
    try:
        alloc = mpi_comm.Get_info().get("mpi_memory_alloc_kinds")
    except Exception:
        alloc = None
    return decide(alloc, _query_mpix(), dict(os.environ))
