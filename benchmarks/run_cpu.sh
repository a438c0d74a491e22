#!/usr/bin/env bash
# The CPU tables of docs/PERFORMANCE.md: one torch thread, the tiny 32 px variant for steps and loops.
#
#   bash benchmarks/run_cpu.sh                  # every case -> $OUT (default benchmarks/results/cpu)
#   bash benchmarks/run_cpu.sh loader           # only the named cases;  --list  prints them
#
# loader: the PIL float path against the uint8 path, per core, in alternating rounds (photo-like 256-500 px JPEGs,
# the same pre-resized to 256, the 32 px sample). loop_sample: pretrain/mae.py on the shipped sample, end to end vs
# synthetic. step_*: the MAE step through the shared loop, ours vs HF. Run them on a quiet machine (uptime).
set -uo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
OUT=${OUT:-benchmarks/results/cpu}
PY=${PYTHON:-.venv/bin/python}
T=mae_vit_tiny_patch4_dec128d2b
STEP="benchmarks/pretrain_step.py --variant $T --steps 12 --warmup 2 --window 3"
CASES=(
  "loader|benchmarks/loader_throughput.py --rounds 5 --batches 2 --batch-size 32 --agreement 1000"
  "loop_sample|benchmarks/entry_loop.py --entry pretrain --data data/sample run.steps=24 --window 6 --repeat 2"
  "step_fp32_b64|$STEP --batch 64 --precision fp32"
  "step_bf16_b64|$STEP --batch 64 --precision bf16"
  "step_fp32_b64_block|$STEP --batch 64 --precision fp32 --mask-type block --no-hf"
  "profile_fp32_b64|benchmarks/profile_step.py --variant $T --batch 64 --steps 3 --warmup 2"
)
if [[ "${1:-}" == "--list" ]]; then
  for c in "${CASES[@]}"; do echo "${c%%|*}: ${c#*|}"; done
  exit 0
fi
mkdir -p "$OUT"
wanted=" $* "
uptime
for c in "${CASES[@]}"; do
  name=${c%%|*}; cmd=${c#*|}
  if [[ $# -gt 0 && "$wanted" != *" $name "* ]]; then continue; fi
  echo "== $name: OMP_NUM_THREADS=$OMP_NUM_THREADS $PY $cmd --out $OUT/$name.json"
  t0=$SECONDS
  $PY $cmd --out "$OUT/$name.json" > "$OUT/$name.log" 2>&1
  echo "$name rc=$? seconds=$(( SECONDS - t0 ))"
  grep -E '^\|' "$OUT/$name.log" | tail -n 12
done
uptime
