#!/usr/bin/env bash
# Model-level projection of APB vs Star vs ring vs one GPU (issue 24) on ONE GPU of the device machine.
#   bash jobs/project_model.sh validate   # projection of a one-GPU prefill vs a real one-rank run of the same work
#   bash jobs/project_model.sh short      # 8 hosts, 32K and 64K, Llama-3.1-8B shape, 32 layers
#   bash jobs/project_model.sh long       # 8 hosts, 128K
# Logs and HDF5 records go to $OUT (or runs/). Links: 200 GB/s (NVLink node) and 25 GB/s (InfiniBand), 10 us.
set -uo pipefail
OUT=${OUT:-runs}; mkdir -p "$OUT"
source "$(dirname "$0")/device_env.sh"            # multicast off, PYTHONPATH, $PY, $MPI_PREFIX
export OMP_NUM_THREADS=8
LINKS="--hosts 8 --link-gbps 200 --latency-us 10 --more-link-gbps 25"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader
$PY -c "import torch; print('torch', torch.__version__)"
for what in "$@"; do
  case $what in
    validate)
      # the same work twice: hpcattn run (1 rank, local prefill + decode, eager) and the projection's one-GPU row
      common="--set model.layers=8 --set context=32768 --set generate.new_tokens=8"
      timeout 300 $MPI_PREFIX -n 1 $PY -m hpcattn run \
        configs/project_llama8b.yaml $common --set generate.prefill=local --set generate.decode=local \
        --set run.cuda_graphs=false --set run.repeats=3 --set run.warmup=1 -o "$OUT/validate-run.h5" 2>&1 | tee "$OUT/validate.log"
      timeout 300 $PY -m hpcattn project configs/project_llama8b.yaml $common --set generate.prefill=local \
        --set run.repeats=3 $LINKS -o "$OUT/validate-project.h5" 2>&1 | tee -a "$OUT/validate.log"
      $PY - "$OUT/validate-run.h5" "$OUT/validate-project.h5" <<'PYEOF' 2>&1 | tee -a "$OUT/validate.log"
import json, sys, h5py
from hpcattn.results.hdf5 import read_cases
_, rows = read_cases(sys.argv[1])
run = rows[0]
with h5py.File(sys.argv[2]) as f:
    proj = json.loads(f["rows_json"][()])[0]
for k_run, k_proj in (("prefill_median_s", "prefill_s"), ("decode_step_median_s", "decode_step_s")):
    print(f"validate {k_proj}: real one-rank run {run[k_run]:.4f} s, projection {proj[k_proj]:.4f} s, "
          f"ratio {proj[k_proj] / run[k_run]:.3f}")
PYEOF
      ;;
    short)
      timeout ${SHORT_TIMEOUT:-560} $PY -m hpcattn project configs/project_llama8b.yaml --set "context=[32768,65536]" $LINKS \
        -o "$OUT/project-8b-32k-64k.h5" 2>&1 | tee "$OUT/project-short.log" ;;
    long)
      timeout ${LONG_TIMEOUT:-560} $PY -m hpcattn project configs/project_llama8b.yaml --set context=131072 $LINKS \
        -o "$OUT/project-8b-128k.h5" 2>&1 | tee "$OUT/project-long.log" ;;
    *) echo "unknown step $what"; exit 2 ;;
  esac
done
