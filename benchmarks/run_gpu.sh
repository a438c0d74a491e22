#!/usr/bin/env bash
# The GPU benchmark run list, for one call on a lent H100 (device tool: 600 s per command, 30 min per session).
#
#   bash benchmarks/run_gpu.sh                      # every case, in priority order, within BUDGET_S seconds
#   bash benchmarks/run_gpu.sh b16_bs256 e2e_b16    # only the named cases (split the list over several calls)
#   bash benchmarks/run_gpu.sh --list               # the case names
#
# Writes $OUT/<case>.json and <case>.log (OUT defaults to /tmp/tessera-bench), $OUT/status.txt (exit code and
# seconds per case), $OUT/nvidia-smi.txt, and prints benchmarks/summarize.py's table last. A case that fails
# (out of memory, say) is recorded and the list goes on; cases that no longer fit the budget are skipped and listed.
# Device set-up: the GPU image lacks webdataset; with the wheels copied to .whl/ (see
# /work/shared/wheels-gpu/README.md, and name .whl in the device tool's carry) it is installed into /tmp/site.
# Only webdataset + braceexpand are installed: the other wheels there (DeepSpeed, pydantic) are not needed here.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/tessera-bench}
BUDGET_S=${BUDGET_S:-560}        # stop starting cases after this many seconds (the call's limit is 600)
CASE_TIMEOUT=${CASE_TIMEOUT:-240}
MIN_CASE_S=${MIN_CASE_S:-40}     # do not start a case with less time than this left
SHARDS=${SHARDS:-/tmp/tessera-bench-shards}
PY=${PYTHON:-$(command -v python3 || command -v python)}
WORKERS=${WORKERS:-$(( $(nproc) > 2 ? $(nproc) - 2 : 1 ))}
mkdir -p "$OUT"
START=$SECONDS

B=mae_vit_base_patch16_dec512d8b
L=mae_vit_large_patch16_dec512d8b
H=mae_vit_huge_patch14_dec512d8b
DEV=cuda
TAIL=""             # appended to every benchmark command (argparse: the last value wins)
SHARD_ARGS="--images 16000 --shards 32"
if [[ "${CPU_CHECK:-0}" == 1 ]]; then  # logic check on a CPU machine: tiny model, batch 8, one timed step
  B=mae_vit_tiny_patch4_dec128d2b; L=$B; H=$B; DEV=cpu; WORKERS=1
  TAIL="--batch 8 --steps 1 --warmup 1 --override depth=2 decoder_depth=1"
  SHARD_ARGS="--images 64 --shards 4 --min-px 40 --max-px 64"
  SHARDS=$OUT/shards
fi
STEP="benchmarks/pretrain_step.py --device $DEV --precision bf16 --steps 20 --warmup 5"
FT="benchmarks/finetune_step.py --device $DEV --precision bf16 --steps 20 --warmup 5"
E2E="benchmarks/pretrain_e2e.py --device $DEV --precision bf16 --steps 40 --warmup 5"

# name | command (priority order: the headline numbers first)
CASES=(
  "b16_bs256|$STEP --variant $B --batch 256"
  "b16_bs512|$STEP --variant $B --batch 512"
  "b16_bs512_compile|$STEP --variant $B --batch 512 --compile-vs-eager"
  "e2e_b16|make_shards && $PY $E2E --variant $B --batch 512 --data $SHARDS:train --workers $WORKERS"
  "ft_b16_bs256|$FT --variant $B --batch 256"
  "l16_bs256|$STEP --variant $L --batch 256"
  "b16_bs256_nosdpa|$STEP --variant $B --batch 256 --no-sdpa"
  "b16_bs256_nofusedadamw|$STEP --variant $B --batch 256 --fused-adamw off --no-hf"
  "h14_bs256_ckpt|$STEP --variant $H --batch 256 --grad-ckpt"
  "b16_bs256_compile|$STEP --variant $B --batch 256 --compile-vs-eager"
  "l16_bs256_compile|$STEP --variant $L --batch 256 --compile-vs-eager"
  "ft_b16_bs256_compile|$FT --variant $B --batch 256 --compile"
)

if [[ "${1:-}" == "--list" ]]; then
  for c in "${CASES[@]}"; do echo "${c%%|*}: ${c#*|}"; done
  exit 0
fi

make_shards() {  # ImageNet-sized JPEG shards from the shipped sample (once per machine)
  $PY benchmarks/make_bench_shards.py --output "$SHARDS" $SHARD_ARGS --workers "$WORKERS"
}

# ---- environment ---------------------------------------------------------------------------------------------
if ! $PY -c "import webdataset" 2>/dev/null; then
  if ls .whl/webdataset-*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site \
      .whl/webdataset-*.whl .whl/braceexpand-*.whl && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
  else
    echo "warning: webdataset is missing and there is no .whl/ folder: the end-to-end case will fail" >&2
  fi
fi
if [[ $DEV == cuda ]]; then nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || echo "warning: nvidia-smi failed" >&2; fi
$PY -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__, 'cuda', torch.cuda.is_available())" \
  | tee "$OUT/versions.txt"

# ---- cases ---------------------------------------------------------------------------------------------------
wanted=" $* "
skipped=()
: > "$OUT/status.txt"
for c in "${CASES[@]}"; do
  name=${c%%|*}; cmd=${c#*|}
  if [[ $# -gt 0 && "$wanted" != *" $name "* ]]; then continue; fi
  left=$(( BUDGET_S - (SECONDS - START) ))
  if (( left < MIN_CASE_S )); then skipped+=("$name"); continue; fi
  limit=$(( left < CASE_TIMEOUT ? left : CASE_TIMEOUT ))
  echo "== $name (limit ${limit}s): $cmd"
  t0=$SECONDS
  if [[ "$cmd" == make_shards* ]]; then
    ( make_shards > "$OUT/$name.shards.log" 2>&1 && timeout "$limit" ${cmd#make_shards && } $TAIL --out "$OUT/$name.json" ) \
      > "$OUT/$name.log" 2>&1
  else
    timeout "$limit" $PY $cmd $TAIL --out "$OUT/$name.json" > "$OUT/$name.log" 2>&1
  fi
  rc=$?
  echo "$name rc=$rc seconds=$(( SECONDS - t0 ))" | tee -a "$OUT/status.txt"
  if (( rc != 0 )); then tail -n 5 "$OUT/$name.log"; fi
done
if (( ${#skipped[@]} )); then
  echo "skipped (budget ${BUDGET_S}s spent; run them in another call): ${skipped[*]}" | tee -a "$OUT/status.txt"
fi
echo
$PY benchmarks/summarize.py "$OUT" --markdown "$OUT/summary.md"
