#!/usr/bin/env bash
# The CPU tables of docs/PERFORMANCE.md: tiny 32 px variant, one torch thread, batch 64-128, fp32 and bf16 autocast.
#
#   bash benchmarks/run_cpu.sh                  # every case -> $OUT (default benchmarks/results/cpu)
#   bash benchmarks/run_cpu.sh step_fp32_b64    # only the named cases;  --list  prints them
#
# Ours and HF ViTMAE (eager and compiled; end to end and synthetic) are timed in alternating blocks (--rounds) so
# that load from other processes on a shared machine hits both alike; step_fp32_b64_repeat repeats the first case
# to show the run-to-run spread. The compiled case needs a C++ compiler (torch inductor) and takes minutes.
set -uo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
OUT=${OUT:-benchmarks/results/cpu}
PY=${PYTHON:-.venv/bin/python}
T=mae_vit_tiny_patch4_dec128d2b
STEP="benchmarks/pretrain_step.py --device cpu --variant $T --steps 12 --warmup 2 --rounds 4"
CASES=(
  "step_fp32_b64|$STEP --batch 64 --precision fp32"
  "step_bf16_b64|$STEP --batch 64 --precision bf16"
  "step_fp32_b128|$STEP --batch 128 --precision fp32"
  "step_fp32_b64_nosdpa|$STEP --batch 64 --precision fp32 --no-sdpa"
  "e2e_fp32_b64|benchmarks/pretrain_e2e.py --device cpu --variant $T --batch 64 --precision fp32 --steps 12 --warmup 2 --workers 1 --stats cifar10 --rounds 3"
  "ft_fp32_b64|benchmarks/finetune_step.py --device cpu --variant $T --batch 64 --precision fp32 --steps 8 --warmup 2 --num-classes 10"
  "ft_bf16_b64|benchmarks/finetune_step.py --device cpu --variant $T --batch 64 --precision bf16 --steps 8 --warmup 2 --num-classes 10"
  "step_fp32_b64_compile|$STEP --batch 64 --precision fp32 --compile-vs-eager --steps 8"
  "step_fp32_b64_repeat|$STEP --batch 64 --precision fp32"
)
if [[ "${1:-}" == "--list" ]]; then
  for c in "${CASES[@]}"; do echo "${c%%|*}: ${c#*|}"; done
  exit 0
fi
mkdir -p "$OUT"
wanted=" $* "
for c in "${CASES[@]}"; do
  name=${c%%|*}; cmd=${c#*|}
  if [[ $# -gt 0 && "$wanted" != *" $name "* ]]; then continue; fi
  echo "== $name: OMP_NUM_THREADS=$OMP_NUM_THREADS $PY $cmd --out $OUT/$name.json"
  t0=$SECONDS
  $PY $cmd --out "$OUT/$name.json" > "/tmp/tessera-cpu-$name.log" 2>&1
  echo "$name rc=$? seconds=$(( SECONDS - t0 ))"
done
$PY benchmarks/summarize.py "$OUT"
