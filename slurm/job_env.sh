# Sourced by slurm/*.sbatch in the submit directory (the repository root): the Python every rank
# runs ($PY) and the run-time environment of hpcattn jobs. Not a job script itself.

# Python: the venv that `make setup` built in the submit directory; HPCATTN_VENV=/path for another,
# HPCATTN_VENV="" for the python on PATH, HPCATTN_PYTHON=/path/to/python for that interpreter as
# it is (no venv; the repository on PYTHONPATH, as `make test HPCATTN_PYTHON=...`).
if [[ -n ${HPCATTN_PYTHON:-} ]]; then
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
else
  HPCATTN_VENV=${HPCATTN_VENV-$PWD/.venv}
  if [[ -n $HPCATTN_VENV && ! -f $HPCATTN_VENV/bin/activate ]]; then
    echo "hpcattn: error: no venv at $HPCATTN_VENV: run \`make setup\` in $PWD, or set" \
         "HPCATTN_VENV=/path/to/venv (\"\" for the python on PATH) or HPCATTN_PYTHON=/path/to/python" >&2
    exit 2
  fi
  if [[ -n $HPCATTN_VENV ]]; then source "$HPCATTN_VENV/bin/activate"; fi
fi
PY=${HPCATTN_PYTHON:-$(command -v python || command -v python3)}   # absolute: the same interpreter on every rank

export PYTHONFAULTHANDLER=1              # Python tracebacks on SIGSEGV/SIGABRT
export PYTHONUNBUFFERED=1                # rank 0's progress reaches the log as it happens
export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-1}
export NCCL_DEBUG=WARN                   # INFO shows the transports NCCL picked (P2P/SHM/NET)
# NVLink multicast (NVLS) off: hpcattn does not need it, and on shared GPU hosts a program that
# uses it can take the node's GPUs out of service. Keep these exported.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
# export HDF5_USE_FILE_LOCKING=FALSE     # if writing the record fails on Lustre/NFS ("unable to lock file")

mkdir -p runs

# run_ranks LAUNCH-COMMAND...: run it and return hpcattn's exit status. srun exits 137 for any
# MPI_Abort, whatever its code (Slurm kills every task of the step), so hpcattn writes the code it
# aborts with to $HPCATTN_ABORT_FILE first and this returns that code instead: 1 a rank crashed,
# 2 an error on one rank, 4 the hang watchdog (docs/cluster.md). Other statuses pass unchanged.
run_ranks() {
  export HPCATTN_ABORT_FILE=$PWD/runs/.abort-${SLURM_JOB_ID:-$$}
  rm -f "$HPCATTN_ABORT_FILE"
  local rc=0 code
  "$@" || rc=$?
  if [[ -s $HPCATTN_ABORT_FILE ]]; then
    code=$(<"$HPCATTN_ABORT_FILE")
    if [[ $code != "$rc" ]]; then   # usually 137; 4 itself when the ranks exited before Slurm killed them
      echo "hpcattn: the ranks ended in MPI_Abort($code) (the launcher exited $rc): job exit status $code" >&2
    fi
    rc=$code
  fi
  rm -f "$HPCATTN_ABORT_FILE"
  return "$rc"
}
