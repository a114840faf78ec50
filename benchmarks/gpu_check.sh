#!/usr/bin/env bash
# The one GPU check: ~8 minutes on one H100, prepared before a GPU is at hand.
#
#   bash benchmarks/gpu_check.sh              # on a GPU machine, from the repo root
#   bash benchmarks/gpu_check.sh --dry-run    # anywhere (CPU, tiny sizes): the script end to end
#
# 1. the CUDA tests (tests/test_cuda.py: no host sync in a bf16 step, --compile through the
#    TGR switch with inductor);
# 2. images/s of one training step (benchmarks/train_step.py) for dense, V-MoE and TGR while
#    distilling (bf16 teacher), DeiT-Ti student, E = 16, 224², batch 128 and 256, eager and
#    compiled;
# 3. the loader (benchmarks/data_loader.py) on generated JPEGs, uint8 vs float32 workers;
# then one summary table, with the issue's targets beside it (reported, not asserted):
# V-MoE >= 85% of dense's images/s (bf16, compiled), TGR <= 1.6x a V-MoE step, loader >= step.
#
# Uses the python on PATH (or $PYTHON) with torch, torchvision and einops installed; pytest
# for part 1 (skipped with a note if missing). Put the summary in docs/benchmarks.md with the
# card's name and the date.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
LOG=$(mktemp -d)
trap 'rm -rf "$LOG"' EXIT

if [ "${1:-}" = "--dry-run" ]; then
  STEP=(--quick --device cpu --threads 2 --repeats 1 --warmup 1)
  BATCHES=(8)
  LOADER=(--quick --device cpu)
  LOADER_WORKERS=1
else
  STEP=(--model tiny --experts 16 --device cuda --repeats 5 --warmup 2)
  BATCHES=(128 256)
  WORKERS=$($PY -c "import os; print(min(10, len(os.sched_getaffinity(0)) - 1))")
  LOADER=(--images 2048 --batch-size 128 --workers 4 "$WORKERS" 16 --passes 2)
  LOADER_WORKERS=$WORKERS
fi

echo "== $(date -u '+%F %H:%M UTC'); $($PY -c 'import torch; print("torch", torch.__version__, "on", torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU (no GPU)")')"

echo "== 1. CUDA tests"
if $PY -c "import pytest" 2>/dev/null; then
  timeout 240 $PY -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 | tail -5
else
  echo "pytest is not installed: CUDA tests skipped"
fi

echo "== 2. training step"
for b in "${BATCHES[@]}"; do
  for mode in eager compiled; do
    flag=(); [ "$mode" = compiled ] && flag=(--compile)
    out="$LOG/step-$b-$mode.txt"
    if timeout 300 $PY benchmarks/train_step.py "${STEP[@]}" --batch-size "$b" \
        --variants dense vmoe "tgr bf16 teacher" "${flag[@]}" >"$out" 2>&1; then
      cat "$out"
    else
      echo "batch $b $mode: did not finish ($(tail -1 "$out"))"
    fi
  done
done

echo "== 3. loader"
timeout 300 $PY benchmarks/data_loader.py "${LOADER[@]}" | tee "$LOG/loader.txt"

echo
echo "== summary ($(date -u +%F))"
echo "| batch | mode | dense img/s | vmoe img/s | tgr img/s | vmoe / dense | tgr step / vmoe step |"
echo "|---:|---|---:|---:|---:|---:|---:|"
for f in "$LOG"/step-*.txt; do
  [ -f "$f" ] || continue
  name=$(basename "$f" .txt); b=${name#step-}; b=${b%-*}; mode=${name##*-}
  awk -F'|' -v b="$b" -v m="$mode" '
    /^\| dense /            { d = $3 + 0 }
    /^\| vmoe /             { v = $3 + 0 }
    /^\| tgr bf16 teacher / { t = $3 + 0 }
    END { if (d && v && t) printf "| %s | %s | %.0f | %.0f | %.0f | %.2f (target >= 0.85) | %.2f (target <= 1.6) |\n", b, m, d, v, t, v / d, v / t }' "$f"
done
awk -F'|' -v w="$LOADER_WORKERS" '$2 + 0 == w && w != "" { printf "loader with %s workers (the default): %s uint8 images/s (target: >= the step'"'"'s images/s)\n", w, $3 }' "$LOG/loader.txt"
