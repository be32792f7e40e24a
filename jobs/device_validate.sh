#!/usr/bin/env bash
# On the GPU device machine (2 GPUs): GPU tests, transport check, first benchmarks.
#   bash jobs/device_validate.sh [tests|decode|prefill|all]   (logs and HDF5 files to $OUT or runs/)
set -uo pipefail
OUT=${OUT:-runs}; mkdir -p "$OUT"
source "$(dirname "$0")/device_env.sh"            # multicast off, PYTHONPATH, $PY, $MPIRUN (2 ranks)
what=${1:-all}
if [[ $what == tests || $what == all ]]; then
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; nvidia-smi topo -m | head -4
  $PY -c "import torch, mpi4py.MPI as M; print(torch.__version__, torch.cuda.device_count(), M.Get_library_version().splitlines()[0])"
  timeout 300 $PY -m pytest -q -ra -m gpu tests/test_gpu.py -p no:cacheprovider 2>&1 | tail -25
  for b in nccl mpi; do timeout 120 $MPIRUN $PY -m hpcattn check-comm --backend $b --repeats 30; done
fi
for b in nccl mpi; do
  if [[ $what == decode || $what == all ]]; then
    timeout 300 $MPIRUN $PY -m hpcattn run configs/bench/decode_2gpu.yaml --set comm.backend=$b --set run.repeats=10 \
      -o "$OUT/decode-$b.h5" 2>&1 | grep -av '^\[rank'
  fi
  if [[ $what == prefill || $what == all ]]; then
    timeout 300 $MPIRUN $PY -m hpcattn run configs/bench/prefill_2gpu.yaml --set comm.backend=$b \
      -o "$OUT/prefill-$b.h5" 2>&1 | grep -av '^\[rank'
  fi
done
# Next GPU session (issue 5): 8-host projection on ONE GPU, then the 2-GPU APB/Star/ring run.
if [[ $what == project ]]; then
  $PY -m hpcattn project configs/prefill_apb.yaml --hosts 8 --set context=131072 --set shape.query_len=64 \
      --link-gbps 200 --latency-us 35 -o "$OUT/project-8hosts.h5"
  timeout 400 $MPIRUN $PY -m hpcattn run configs/prefill_apb.yaml --set context=131072 --set shape.query_len=64 \
      --set comm.backend=nccl -o "$OUT/apb-2gpu.h5" 2>&1 | grep -av '^\[rank'
fi
