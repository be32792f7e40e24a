#!/usr/bin/env bash
# Run ON the GPU machine (nvidia-h200-x2), from the repo root, with the tarball
# made by scripts/build-cuda-mpi.sh carried along (issue 8; docs/cuda-aware-mpi.md).
#
# The device tool carries ignored paths named in `carry`; build/ is ignored, so
# carry the tarball where the build left it (about 10 MiB of the 64 MiB a call):
#
#   run(kind="nvidia-h200-x2", carry=["build/cuda-mpi.tar.xz"],
#       command="set -o pipefail; bash scripts/cuda-mpi-on-device.sh 2>&1 | tee $OUT/cuda-mpi.log")
#
# (or put it at .cudampi/cuda-mpi.tar.xz after `echo /.cudampi/ >> .git/info/exclude`
# and carry ".cudampi"). Results go to $OUT (the device tool's folder that comes
# back) when set, else to runs/cuda-mpi/.
#
# Environment (optional):
#   CUDA_MPI_TARBALL  tarball path (default: first of .cudampi/cuda-mpi.tar.xz, build/cuda-mpi.tar.xz)
#   CUDA_MPI_DEST     where to unpack (default: /tmp; the prefix is $CUDA_MPI_DEST/cuda-mpi)
#   STEPS             which steps to run (default: "check probe comm decode prefill")
#   DECODE_ARGS, PREFILL_ARGS  extra `hpcattn run` arguments, e.g. to keep a call
#                     short: DECODE_ARGS="--set shape.context=1048576"
#                            PREFILL_ARGS="--set shape.context=131072"
#
# What comes back from $OUT is at most 8 files: this writes 4 (two .h5 records and
# their `hpcattn report` tables); everything else is on stdout (tee it to $OUT).
set -euo pipefail

# --- 0. safety: NVLink multicast stays off on these shared hosts (KINDS.md) ---------
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1

STEPS="${STEPS:-check probe comm decode prefill}"
DECODE_ARGS="${DECODE_ARGS:-}" PREFILL_ARGS="${PREFILL_ARGS:-}"
want() { [[ " $STEPS " == *" $1 "* ]]; }
FAILED=()                            # steps that failed; the script goes on and reports them at the end
fail() { echo "!!!!! FAILED: $1 (exit $2)"; FAILED+=("$1"); }
step() { printf '\n===== [%s] %s\n' "$(date +%H:%M:%S)" "$*"; }

# --- 1./2. unpack the prebuilt Open MPI into /tmp and point PATH, LD_LIBRARY_PATH, OPAL_PREFIX
# and mpi4py at it (scripts/cuda-mpi-env.sh says why each variable) ---------------------------
step "unpack the carried CUDA-aware Open MPI"
source scripts/cuda-mpi-env.sh
cuda_mpi_setup || exit 1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"    # hpcattn from this checkout
export PYTHONUNBUFFERED=1
PY="$(command -v python3)"           # the image's python3 (holds torch and mpi4py)
RESULTS="${OUT:-$PWD/runs/cuda-mpi}"
mkdir -p "$RESULTS"
# mpirun: 2 ranks (one per GPU; hpcattn maps rank -> local GPU), every variable forwarded.
MPIRUN=("${CUDA_MPIRUN[@]}" -n 2)

# --- 3. what is there: GPUs, which mpirun, CUDA support built in ------------------------
if want check; then
    step "machine and library"
    nvidia-smi -L || true
    "$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, "gpus", torch.cuda.device_count())'
    "$PY" -c 'import mpi4py; print("mpi4py", mpi4py.__version__, mpi4py.__file__)'
    command -v mpirun
    ompi_info --parsable --all | grep -E '(mpi|opal)_built_with_cuda_support:value:'
    ompi_info | grep -E 'Package:|Prefix:|btl: smcuda|coll: cuda' || true
fi

# --- 4. mpi4py loads OUR libmpi.so.40, and hpcattn's probe says CUDA-aware -------------
if want probe; then
    step "MPI.Get_library_version() (singleton, no mpirun)"
    "$PY" -c "from mpi4py import MPI; print(MPI.Get_library_version())"
    step "which libmpi is mapped, and hpcattn's probe"
    "$PY" -c "from mpi4py import MPI; from hpcattn.comm.gpu_aware import _loaded_libmpi; print(_loaded_libmpi())"
    "$PY" -c "from hpcattn.comm.gpu_aware import probe; from mpi4py import MPI; print(probe(MPI.COMM_WORLD))"
    # expected: (True, 'MPIX_query'); Debian's own 4.1.6 would give (False, 'MPIX_query').
fi

# --- 5. hpcattn's transport check on device buffers through MPI -------------------------
# gpu-aware true: device pointers go straight to MPI (transport mpi_device);
# then auto (must resolve true by the probe) and false (mpi_staged) for comparison.
if want comm; then
    step "check-comm --backend mpi --gpu-aware-mpi true"
    "${MPIRUN[@]}" "$PY" -m hpcattn check-comm --backend mpi --device cuda --gpu-aware-mpi true \
        || fail "check-comm mpi-device" $?
    step "check-comm --backend mpi --gpu-aware-mpi auto"
    "${MPIRUN[@]}" "$PY" -m hpcattn check-comm --backend mpi --device cuda --gpu-aware-mpi auto \
        || fail "check-comm mpi-auto" $?
    step "check-comm --backend mpi --gpu-aware-mpi false (host-staged)"
    "${MPIRUN[@]}" "$PY" -m hpcattn check-comm --backend mpi --device cuda --gpu-aware-mpi false \
        || fail "check-comm mpi-staged" $?
fi

# --- 6./7. tree decode (all-reduce / all-gather of merge messages) and ring prefill (send/recv
# of KV blocks) over GPU-aware MPI: one record and its report table each -------------------
bench_mpi_device() {   # NAME CONFIG EXTRA_ARGS
    step "$2, comm.backend=mpi, gpu_aware_mpi=true"
    # shellcheck disable=SC2086  # EXTRA_ARGS is a word list on purpose
    "${MPIRUN[@]}" "$PY" -m hpcattn run "$2" $3 \
        --set comm.backend=mpi --set comm.gpu_aware_mpi=true -o "$RESULTS/$1-mpi-device.h5" \
        && "$PY" -m hpcattn report "$RESULTS/$1-mpi-device.h5" | tee "$RESULTS/$1-mpi-device.txt" \
        || fail "$1" $?
}
if want decode; then bench_mpi_device decode configs/bench/decode_2gpu.yaml "$DECODE_ARGS"; fi
if want prefill; then bench_mpi_device prefill configs/bench/prefill_2gpu.yaml "$PREFILL_ARGS"; fi

step "done; results in $RESULTS"
if ((${#FAILED[@]})); then echo "failed steps: ${FAILED[*]}"; exit 1; fi
