#!/usr/bin/env bash
# Issue 27 on ONE GPU (H100 or H200), one call of at most 10 minutes: Lamina with each role's work
# between two exchanges captured as CUDA graphs, against the eager path and the cost model.
#   bash jobs/lamina_graphs.sh            (env: OUT=dir for logs/records, default runs/lamina_graphs;
#                                          LAYERS=8 of the Llama-3.1-8B shape's 32 layers; NEW=12 tokens;
#                                          BACKEND=mpi, or nccl on a node with 2 GPUs: the same run there;
#                                          GPU_TESTS=0 skips step 1, EAGER=0 the eager runs)
# LAYERS: `hpcattn run` draws random weights on the CPU (an 8B model's 32 layers take minutes there);
# the role times of step 3 are measured on the same LAYERS layers (no scaling), so every ratio holds.
# Steps (each under `timeout`; about 2 minutes without step 5, 4 to 5 with it, when nothing hangs; a
# failing step does not stop the next ones, every log stays in $OUT):
#   1. GPU tests: tests/test_lamina_gpu.py (captured pieces == eager pieces bitwise; 2 ranks on this
#      GPU over host-staged MPI, float32 tokens identical graph vs eager) and the colocated
#      runner's graph test (the fused decode forward was split into pieces);
#   2. the link the exchange sees: benchmarks/lamina_link.py, 2 ranks, host-staged MPI (measure_link);
#   3. the roles' captured-segment and eager times on this card: benchmarks/lamina_measure.py
#      (MTIME(B), ATIME(B, 4K) at B = 1, 16; 8B shape, LAYERS layers, not scaled);
#   4. Lamina, 1 model + 1 attention rank sharing this GPU over host-staged MPI, Llama-3.1-8B shape
#      (random weights, bf16), B = 1 and 16, 4K context, one micro-batch: run.cuda_graphs=auto
#      (the default: captured on a GPU; the report shows each role's mode), then false
#      (run.check=false: a float32 reference copy of 8B would not fit beside the two ranks;
#      correctness is step 1's);
#   5. where the CUDA-aware Open MPI of scripts/build-cuda-mpi.sh is carried (build/cuda-mpi.tar.xz
#      or .cudampi/cuda-mpi.tar.xz; scripts/cuda-mpi-env.sh): the library and hpcattn's probe, the
#      2-rank graph-vs-eager check over it (device buffers to MPI: transport mpi_device), its link,
#      and step 4's two runs over it (comm.gpu_aware_mpi=true); step 6 then reports both transports.
#   6. benchmarks/lamina_graphs_report.py: per role step / busy / wait, graph vs eager, against the
#      cost model's prediction with the measured link, and the issue's targets.
# Not run here: NCCL (two ranks on one GPU: NCCL refuses a duplicate GPU); on two GPUs, BACKEND=nccl
# runs steps 2 and 4 over NCCL, one rank per GPU (the multi-GPU issue takes the figure).
# Files back (at most 8): lamina_graphs.log, gpu_tests.log, link.json, link-device.json,
# measure.json, records.tar (the .h5 records), report.md, report.json.
set -uo pipefail
OUT=${OUT:-runs/lamina_graphs}; mkdir -p "$OUT"
LAYERS=${LAYERS:-8}; NEW=${NEW:-12}; BACKEND=${BACKEND:-mpi}
source "$(dirname "$0")/device_env.sh"            # multicast off, PYTHONPATH, $PY, $MPIRUN (2 ranks)
LOG="$OUT/lamina_graphs.log"
TMP=$(mktemp -d)
step() { echo "=== $(date -u +%H:%M:%S) $*" | tee -a "$LOG"; }
T0=$SECONDS

step "setup"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  $PY -c "import torch, triton, mpi4py.MPI as M; print('torch', torch.__version__, 'triton', triton.__version__, M.Get_library_version().splitlines()[0])"
  git log --oneline -1
  timeout 120 $PY -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -3; } >> "$LOG" 2>&1

if [[ ${GPU_TESTS:-1} == 1 ]]; then
  step "1. GPU tests"
  timeout 200 $PY -m pytest -q -ra -m gpu -p no:cacheprovider tests/test_lamina_gpu.py \
      "tests/test_graph_gpu.py::test_runner_graph_tokens_identical_to_eager_fp32" > "$OUT/gpu_tests.log" 2>&1
  echo "rc=$? ($((SECONDS - T0)) s)" | tee -a "$LOG"; tail -6 "$OUT/gpu_tests.log" >> "$LOG"
else
  step "1. GPU tests skipped (GPU_TESTS=0)"
fi

step "2. link (comm.backend=$BACKEND: host-staged MPI unless CUDA-aware; 2 ranks)"
timeout 60 $MPIRUN $PY benchmarks/lamina_link.py --backend $BACKEND -o "$OUT/link.json" >> "$LOG" 2>&1
echo "rc=$? ($((SECONDS - T0)) s)" | tee -a "$LOG"

step "3. captured-segment and eager role times (lamina_measure, 8B shape)"
timeout 120 $PY benchmarks/lamina_measure.py --only-8b --layers $LAYERS --no-scale --no-colocated --batches 1,16 \
    --contexts 4096 --context 4096 --max-seconds 80 -o "$OUT/measure.json" > "$TMP/measure.out" 2>&1
echo "rc=$? ($((SECONDS - T0)) s)" | tee -a "$LOG"; grep -E "MTIME|ATIME|FAILED|skipped|device" "$TMP/measure.out" >> "$LOG"

RUN=(configs/generate.yaml --set generate.decode=lamina --set generate.prefill=local --set model.preset=llama-3.1-8b
     --set model.layers=$LAYERS --set shape.dtype=bfloat16 --set 'shape.batch=[1,16]' --set context=4096
     --set lamina.microbatches=1 --set generate.new_tokens=$NEW --set comm.backend=$BACKEND
     --set run.warmup=1 --set run.repeats=2 --set run.check=false --set run.case_timeout_s=300)
lamina_runs() {   # TAG MPIRUN...: the captured and the eager run -> $OUT/lamina-{graph,eager}TAG.h5
  local tag=$1 mode name; shift
  for mode in auto $([[ ${EAGER:-1} == 1 ]] && echo false); do   # auto: the default, which captures on a GPU
    name=$([[ $mode == auto ]] && echo graph || echo eager)$tag
    step "4. Lamina 1 model + 1 attention rank, comm.backend=$BACKEND${tag:+ ($tag)}, run.cuda_graphs=$mode"
    timeout 150 "$@" $PY -m hpcattn run "${RUN[@]}" "${EXTRA[@]}" --set run.cuda_graphs=$mode -o "$TMP/lamina-$name.h5" \
        2>&1 | grep -av '^\[rank' | tail -40 >> "$LOG"
    echo "rc=${PIPESTATUS[0]} ($((SECONDS - T0)) s)" | tee -a "$LOG"
    [[ -f $TMP/lamina-$name.h5 ]] && cp "$TMP/lamina-$name.h5" "$OUT/"
    [[ -f $OUT/lamina-$name.h5 ]] && timeout 60 $PY -m hpcattn report "$OUT/lamina-$name.h5" >> "$LOG" 2>&1
  done
}
EXTRA=()
lamina_runs "" $MPIRUN

REPORT=(--graph "$OUT/lamina-graph.h5" --link "$OUT/link.json")
[[ -f $OUT/lamina-eager.h5 ]] && REPORT+=(--eager "$OUT/lamina-eager.h5")
if [[ $BACKEND == mpi && ( -f build/cuda-mpi.tar.xz || -f .cudampi/cuda-mpi.tar.xz ) ]]; then
  step "5. CUDA-aware Open MPI (scripts/cuda-mpi-env.sh): probe, graph-vs-eager check, link, Lamina runs"
  (
    source scripts/cuda-mpi-env.sh
    cuda_mpi_setup >> "$LOG" 2>&1 || exit 1
    { ompi_info --parsable --all | grep -E '(mpi|opal)_built_with_cuda_support:value:'
      timeout 30 $PY -c "from mpi4py import MPI; print(MPI.Get_library_version().splitlines()[0]); \
from hpcattn.comm.gpu_aware import probe; print('probe', probe(MPI.COMM_WORLD))"; } >> "$LOG" 2>&1
    timeout 150 "${CUDA_MPIRUN[@]}" -n 2 $PY -m mpi4py tests/mpi_progs/check_lamina_gpu.py > "$TMP/check-device.log" 2>&1
    echo "check_lamina_gpu over CUDA-aware MPI: rc=$? ($((SECONDS - T0)) s)" | tee -a "$LOG"
    grep -a "transport\|generation 1\|check_lamina_gpu\|Error\|error" "$TMP/check-device.log" | tail -20 >> "$LOG"
    timeout 60 "${CUDA_MPIRUN[@]}" -n 2 $PY benchmarks/lamina_link.py --backend mpi --gpu-aware-mpi true \
        -o "$OUT/link-device.json" >> "$LOG" 2>&1
    echo "link over CUDA-aware MPI: rc=$? ($((SECONDS - T0)) s)" | tee -a "$LOG"
    EXTRA=(--set 'comm.gpu_aware_mpi="true"')
    lamina_runs "-device" "${CUDA_MPIRUN[@]}" -n 2
  )
  echo "step 5 rc=$? ($((SECONDS - T0)) s)" | tee -a "$LOG"
  [[ -f $OUT/link-device.json && -f $OUT/lamina-graph-device.h5 ]] && REPORT+=(--graph "$OUT/lamina-graph-device.h5"
      --link "$OUT/link-device.json")
  [[ -f $OUT/lamina-eager-device.h5 ]] && REPORT+=(--eager "$OUT/lamina-eager-device.h5")
else
  step "5. skipped: no CUDA-aware Open MPI carried (scripts/build-cuda-mpi.sh; carry build/cuda-mpi.tar.xz)"
fi

step "6. report"
timeout 60 $PY benchmarks/lamina_graphs_report.py "${REPORT[@]}" \
    --measure "$OUT/measure.json" --md "$OUT/report.md" -o "$OUT/report.json" >> "$LOG" 2>&1
echo "rc=$? ($((SECONDS - T0)) s)" | tee -a "$LOG"
(cd "$OUT" && ls lamina-*.h5 >/dev/null 2>&1 && tar -cf records.tar lamina-*.h5 && rm -f lamina-*.h5)
rm -rf "$TMP"
step "done in $((SECONDS - T0)) s; files: $(ls "$OUT" | tr '\n' ' ')"
