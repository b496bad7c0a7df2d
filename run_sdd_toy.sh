#!/usr/bin/env bash
# The offline demo: erase "red" from the shipped toy model with SDD, then measure before/after with the toy judge.
# CPU, a few minutes. Usage: bash run_sdd_toy.sh [OUTPUT_DIR] [extra train_sdd.py flags...]
set -euo pipefail
# The concepts are the red captions, one per step (c_s = c_p): the toy model only ever saw "a {colour} {shape}", so
# the bare word "red" does nothing at lr <= 1e-4 and collapses every colour at 3e-4. SDD's window on this tiny model is narrow: with these settings red is gone
# at step 375 while the other colours hold; by step 400 yellow starts to go too (benchmarks/time_to_erase.py).
HERE=$(cd "$(dirname "$0")" && pwd)
export HF_HUB_OFFLINE=1 PYTHONPATH="$HERE${PYTHONPATH:+:$PYTHONPATH}"
OUTPUT_DIR=${1:-$HERE/outputs/toy-sdd}
shift || true
if [ -d "$OUTPUT_DIR/unet" ]; then
  echo "$OUTPUT_DIR/unet exists: skipping training (delete it to retrain)"
else
  python "$HERE"/train_sdd.py \
    --pretrained_model_name_or_path "$HERE/assets/toy-sd" \
    --removing_concepts "a red circle" "a red square" "a red triangle" \
    --removal_target current \
    --num_train_steps 375 \
    --train_batch_size 4 \
    --learning_rate 1e-4 \
    --ema_decay 0.99 \
    --num_ddim_steps 20 \
    --guidance_scale 3.0 \
    --checkpointing_steps 100 \
    --resume_from_checkpoint latest \
    --validation_prompts "a red circle" "a green square" "a blue triangle" \
    --validation_steps 100 \
    --num_validation_images 6 \
    --seed 0 \
    --output_dir "$OUTPUT_DIR" \
    "$@"
fi
python -m utils.toy compare --base "$HERE/assets/toy-sd" --unet "$OUTPUT_DIR/unet" --output "$OUTPUT_DIR/before_after.png"
