# Sourced (from the repository root) by the scripts that run on the device machine: NVLink
# multicast off in NCCL, PyTorch and NVSHMEM (the device README: never on), the repository on
# PYTHONPATH, unbuffered Python with tracebacks on faults, and
#   PY          the python that holds PyTorch
#   MPI_PREFIX  mpirun (Open MPI, as root, ranks may share a GPU) exporting these variables; add -n N
#   MPIRUN      $MPI_PREFIX -n 2
# A script sets its own OMP_NUM_THREADS after sourcing (default 4).
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 PYTHONFAULTHANDLER=1 OMP_NUM_THREADS=4
PY=$(command -v python3)
MPI_PREFIX="mpirun --allow-run-as-root --oversubscribe -x PYTHONPATH -x PYTHONUNBUFFERED -x PYTHONFAULTHANDLER
 -x OMP_NUM_THREADS -x NCCL_NVLS_ENABLE -x TORCH_SYMM_MEM_DISABLE_MULTICAST -x NVSHMEM_DISABLE_NVLS"
MPIRUN="$MPI_PREFIX -n 2"
