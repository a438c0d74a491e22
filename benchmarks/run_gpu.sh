#!/usr/bin/env bash
# The GPU benchmark run: the cases below in priority order within $BUDGET seconds, labelled by the GPU. Into OUT_DIR:
# bench_<GPU>.tar.gz (each case's JSON and log), status.txt (exit code, seconds) and summary_<GPU>.md (printed last).
#   bash benchmarks/run_gpu.sh OUT_DIR [CASE ...]   # on a GPU host, in the project's environment; --list: the cases
#   CHECK=1 bash benchmarks/run_gpu.sh OUT_DIR      # the same cases on CPU with a tiny model: checks the run only
# Targets: loop_b16 (MAE-B/16 pretraining, synthetic then end to end from shards pre-resized to 256) >= 8,000 img/s,
# e2e >= 0.9 of synthetic; ft_b16 >= 4,000; step_b16_hf: ours / HF ViTMAE >= 2; step_b16_block: the block masks' cost;
# loader_cpu <= 1.2 / 0.8 ms/img per core; loop_l16 (MAE-L/16) >= 3,800; probe_b16 (streamed) >= 12,000.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: bash benchmarks/run_gpu.sh OUT_DIR [CASE ...]}; shift
SCRATCH=${SCRATCH:-benchmarks/results/scratch}; BUDGET=${BUDGET:-520}; PY=${PYTHON:-python}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
W=$(( $(nproc) > 3 ? $(nproc) - 2 : 1 ))
STEP="benchmarks/pretrain_step.py --batch 256 --steps 20 --warmup 5 --precision bf16"
if [[ -n "${CHECK:-}" ]]; then  # a tiny model at 32 px on the CPU, the same commands otherwise
  export CUDA_VISIBLE_DEVICES= OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
  W=1; LABEL=cpu; PHOTO=$SCRATCH/photo-cpu; T=mae_vit_tiny_patch4_dec128d2b
  SHARDS="--shards 4 --images 48 --min-px 40 --max-px 72 --resize 36"
  PRE="model.name=$T model.img_size=32 data.micro_batch=8 optim.grad_accum_steps=1 run.steps=4"
  DOWN="arch=$T model.img_size=32 data.global_batch=8 optim.grad_accum_steps=1 data.eval_batch=16 run.steps=4"
  STEP="benchmarks/pretrain_step.py --variant $T --batch 8 --steps 2 --warmup 1"
  LOADER="--cases sample --images 48 --batches 1 --batch-size 8"
else
  LABEL=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n1 | tr -cs 'A-Za-z0-9' _)
  LABEL=${LABEL%_}; LABEL=${LABEL:-gpu}
  PHOTO=$SCRATCH/photo-256; SHARDS="--shards 32 --images 10240 --resize 256"
  PRE="run.steps=16"; DOWN="run.steps=16"; LOADER="--images 200 --batches 2 --batch-size 32"
fi
MAKE="$PY benchmarks/make_bench_shards.py --output $PHOTO --workers $W $SHARDS"
LOOP="$PY benchmarks/entry_loop.py --data $PHOTO --window 4 data.num_workers=$W"
FT="encoder=random num_classes=10 data.test=$PHOTO:train $DOWN"
CASES=(  # name|seconds worth starting it with|command
  "loop_b16|120|$MAKE && $LOOP --entry pretrain pretrain/configs/in1k_vit_base_1gpu.yaml $PRE"
  "ft_b16|100|$MAKE && $LOOP --entry finetune finetune/configs/in1k_vit_base_1gpu.yaml $FT"
  "step_b16_hf|60|$PY $STEP"
  "step_b16_block|60|$PY $STEP --no-hf --mask-type block $([[ -z ${CHECK:-} ]] && echo --compile)"
  "loader_cpu|60|$PY benchmarks/loader_throughput.py --scratch $SCRATCH --rounds 2 $LOADER"
  "loop_l16|100|$LOOP --entry pretrain --modes synthetic pretrain/configs/in1k_vit_large_1gpu.yaml $PRE"
  "probe_b16|60|$MAKE && $LOOP --entry linprobe finetune/configs/linprobe_in1k_vit_base_1gpu.yaml $FT run.steps=8"
)
if [[ "${1:-}" == "--list" ]]; then printf '%s\n' "${CASES[@]}"; exit 0; fi
WORK=$SCRATCH/cases; rm -rf "$WORK"; mkdir -p "$WORK" "$OUT"; : > "$OUT/status.txt"; : > "$OUT/summary_$LABEL.md"
for c in "${CASES[@]}"; do
  IFS='|' read -r name need cmd <<< "$c"
  if [[ $# -gt 0 && " $* " != *" $name "* ]]; then continue; fi
  left=$(( BUDGET - SECONDS ))
  if (( left < need )); then echo "$name skipped: $left s left < $need s" | tee -a "$OUT/status.txt"; continue; fi
  t0=$SECONDS
  echo "== $name: $cmd --out $WORK/$name.json"
  timeout "$left" bash -c "$cmd --out $WORK/$name.json" > "$WORK/$name.log" 2>&1; rc=$?
  echo "$name rc=$rc seconds=$(( SECONDS - t0 ))" | tee -a "$OUT/status.txt"
  { echo "## $name (rc $rc)"; echo; grep -E '^\||^ours' "$WORK/$name.log"; echo; } >> "$OUT/summary_$LABEL.md"
done
tar czf "$OUT/bench_$LABEL.tar.gz" -C "$WORK" .
cat "$OUT/summary_$LABEL.md"
