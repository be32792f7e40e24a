# Sourced (bash, from the repository root) ON a GPU machine: unpack the CUDA-aware Open MPI that
# scripts/build-cuda-mpi.sh built (carried as a tarball; docs/cuda-aware-mpi.md) and point this
# shell's mpirun and mpi4py at it. Used by scripts/cuda-mpi-on-device.sh and jobs/lamina_graphs.sh.
#
# In:  CUDA_MPI_TARBALL  the tarball (default: first of .cudampi/cuda-mpi.tar.xz, build/cuda-mpi.tar.xz)
#      CUDA_MPI_DEST     where to unpack (default /tmp; the prefix is $CUDA_MPI_DEST/cuda-mpi)
# Out: the exports below, and CUDA_MPIRUN, an array: our mpirun, no core binding, CUDA support on,
#      every variable forwarded with -x (add -n N). Returns 1 with one line on stderr when no
#      tarball is there or it does not unpack to an mpirun; the caller decides whether that is fatal.
#
# PATH: our mpirun/orted/ompi_info before Debian's /usr/bin ones.
# LD_LIBRARY_PATH: mpi4py's MPI.openmpi*.so needs libmpi.so.40; this makes the loader take ours
#   instead of /usr/lib/x86_64-linux-gnu/libmpi.so.40 (Debian's, not CUDA-aware). Our libs carry
#   no RPATH to a path that exists there.
# OPAL_PREFIX: the build was installed under build/cuda-mpi on another machine; OPAL_PREFIX
#   relocates it (help files, MCA components in lib/openmpi3, etc/).
# MPI4PY_MPIABI=openmpi: the mpi4py 4.1 wheel holds an MPICH-ABI and an Open MPI ABI extension
#   and picks one by probing libmpi; this pins the Open MPI one (harmless for an mpi4py built
#   from source).
# OMPI_MCA_opal_cuda_support=true: already the default of a CUDA build (it also raises btl/smcuda
#   above btl/vader so device buffers use CUDA IPC); explicit.
# NVLink multicast stays off on these shared hosts (the device README), whoever sourced this.
cuda_mpi_setup() {
    local tarball="${CUDA_MPI_TARBALL:-}" t
    if [[ -z "$tarball" ]]; then
        for t in .cudampi/cuda-mpi.tar.xz build/cuda-mpi.tar.xz; do
            [[ -f "$t" ]] && { tarball="$t"; break; }
        done
    fi
    [[ -n "$tarball" && -f "$tarball" ]] || { echo "cuda-mpi-env: no cuda-mpi.tar.xz carried (scripts/build-cuda-mpi.sh makes it)" >&2; return 1; }
    local dest="${CUDA_MPI_DEST:-/tmp}"
    CUDA_MPI_PREFIX="$dest/cuda-mpi"               # the tarball holds one top-level dir, cuda-mpi/
    rm -rf "$CUDA_MPI_PREFIX"
    tar -C "$dest" -xJf "$tarball" || { echo "cuda-mpi-env: $tarball did not unpack" >&2; return 1; }
    [[ -x "$CUDA_MPI_PREFIX/bin/mpirun" ]] || { echo "cuda-mpi-env: $tarball gave no $CUDA_MPI_PREFIX/bin/mpirun" >&2; return 1; }
    export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
    export PATH="$CUDA_MPI_PREFIX/bin:$PATH"
    export LD_LIBRARY_PATH="$CUDA_MPI_PREFIX/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    export OPAL_PREFIX="$CUDA_MPI_PREFIX" MPI4PY_MPIABI=openmpi OMPI_MCA_opal_cuda_support=true
    export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
    CUDA_MPIRUN=(mpirun --allow-run-as-root --oversubscribe --bind-to none --mca opal_cuda_support 1
                 -x PATH -x LD_LIBRARY_PATH -x OPAL_PREFIX -x PYTHONPATH -x PYTHONUNBUFFERED -x PYTHONFAULTHANDLER
                 -x OMP_NUM_THREADS -x MPI4PY_MPIABI -x OMPI_MCA_opal_cuda_support
                 -x NCCL_NVLS_ENABLE -x TORCH_SYMM_MEM_DISABLE_MULTICAST -x NVSHMEM_DISABLE_NVLS)
    echo "cuda-mpi-env: $tarball -> $CUDA_MPI_PREFIX"
}
