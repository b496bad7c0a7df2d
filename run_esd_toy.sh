#!/usr/bin/env bash
# The offline demo: erase "red" from the shipped toy model with ESD (ESD-x), then measure before/after with the toy judge.
# CPU, a few minutes. Usage: bash run_esd_toy.sh [OUTPUT_DIR] [extra train_esd.py flags...]
set -euo pipefail
# The concept is "a red", not "red": the toy model only ever saw "a {colour} {shape}", and its text encoder is
# causal, so the prefix "a red" gives the colour token exactly the state it has in "a red circle".
HERE=$(cd "$(dirname "$0")" && pwd)
export HF_HUB_OFFLINE=1 PYTHONPATH="$HERE${PYTHONPATH:+:$PYTHONPATH}"
OUTPUT_DIR=${1:-$HERE/outputs/toy-esd}
shift || true
if [ -d "$OUTPUT_DIR/unet" ]; then
  echo "$OUTPUT_DIR/unet exists: skipping training (delete it to retrain)"
else
  python "$HERE"/train_esd.py \
    --pretrained_model_name_or_path "$HERE/assets/toy-sd" \
    --removing_concepts "a red" \
    --num_train_steps 160 \
    --train_batch_size 4 \
    --learning_rate 1e-4 \
    --num_ddim_steps 20 \
    --guidance_scale 3.0 \
    --negative_guidance 1.0 \
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
