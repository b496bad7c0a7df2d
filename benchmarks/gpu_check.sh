#!/usr/bin/env bash
# The GPU check, prepared to run in under 10 minutes on one recent GPU (time limits: 60 + 35 + 140 + 150 + 240 s):
#   1. ours with bf16 frozen weights and --gradient_checkpointing, the configuration meant for 12 GB GPUs;
#   2. SD-1.4-shaped SDD and ESD steps at 512 px, fp32 and bf16, ours and the reference layout:
#      s/step and peak VRAM (torch.cuda.max_memory_allocated from the first training step on);
#   3. SDXL-base-shaped SDD steps at 1024 px (a 2.57 B U-Net, random weights), fp32 and bf16, both layouts.
# A part that fails or runs out of time keeps the runs it finished (its JSON is written after every run).
# Usage: bash benchmarks/gpu_check.sh [RESULT_DIR]     (default: $OUT when set, else gpu_check_results)
# Fails at once, with exit code 3, when torch sees no CUDA device.
set -euo pipefail
cd "$(dirname "$0")/.."
RESULTS=${1:-${OUT:-gpu_check_results}}
MODEL_DIR=${MODEL_DIR:-/tmp/sd14-bench-pipeline}
SDXL_DIR=${SDXL_DIR:-/tmp/sdxl-bench-pipeline}
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$RESULTS"

if ! python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "gpu_check: no CUDA device found (torch.cuda.is_available() is False): nothing measured" >&2
  exit 3
fi
python -c "import torch; p = torch.cuda.get_device_properties(0); \
print(f'torch {torch.__version__}, {p.name}, {p.total_memory / 2**30:.0f} GiB')" | tee "$RESULTS/device.txt"

start=$(date +%s)
if [ ! -f "$MODEL_DIR/model_index.json" ]; then
  timeout 60 python -m benchmarks.sd_shaped "$MODEL_DIR" 2>&1 | grep -v -i "torchvision\|shards" || true
fi
test -f "$MODEL_DIR/model_index.json" || { echo "gpu_check: building the SD-1.4-shaped pipeline failed" >&2; exit 1; }
echo "pipeline ready after $(( $(date +%s) - start )) s"

run_part() {  # NAME SECONDS FLAGS...: one bench_train.py run; a failure or time-out is reported, and the check goes on
  local name=$1 limit=$2 rc
  shift 2
  set +e
  timeout "$limit" python -m benchmarks.bench_train --model sd14 --model_dir "$MODEL_DIR" --resolution 512 \
    --device cuda --steps 3 --warmup 1 --num_ddim_steps 10 "$@" --json "$RESULTS/$name.json" 2>&1 \
    | grep -v -i "torchvision" | tee "$RESULTS/$name.md"
  rc=${PIPESTATUS[0]}
  set -e
  [ "$rc" -eq 0 ] || echo "gpu_check: $name stopped with exit $rc; the runs that finished are in $RESULTS/$name.json" >&2
  echo "$name done after $(( $(date +%s) - start )) s"
}

# 1. the 12 GB configuration: bf16 frozen weights + gradient checkpointing (ours; the reference has no such option)
run_part gpu_512_bf16_gc 35 --mixed_precision bf16 --methods sdd --layouts ours --gradient_checkpointing
# 2. both layouts, both methods, fp32 and bf16 (8 processes; a run that fails, e.g. out of memory, is listed as failed)
run_part gpu_512 140 --mixed_precision no bf16 --methods sdd esd
# 3. SDXL base's shape at 1024 px (the later flags win over run_part's sd14 ones)
if [ ! -f "$SDXL_DIR/model_index.json" ]; then
  timeout 150 python -m benchmarks.sd_shaped "$SDXL_DIR" --family sdxl --width 1.0 2>&1 | grep -v -i "torchvision\|shards" || true
fi
if [ -f "$SDXL_DIR/model_index.json" ]; then
  run_part gpu_sdxl_1024 240 --model sdxl --model_dir "$SDXL_DIR" --resolution 1024 --mixed_precision no bf16 --methods sdd
else
  echo "gpu_check: building the SDXL-shaped pipeline failed or ran out of time; part 3 skipped" >&2
fi
echo "gpu_check done in $(( $(date +%s) - start )) s; results in $RESULTS"
