#!/usr/bin/env bash
# The offline demo: erase the word "red" from the shipped toy model with SDD (c_s = "red", the paper's removal target),
# then measure the result against the base model, seed for seed: how often red still shows on prompts that name it
# (explicit), on held-out phrasings (paraphrase) and on objects that only imply it (implied: "an apple"), how much of
# orange (red's neighbour) and of the other colours is preserved, shape accuracy and training time; and
# OUTPUT_DIR/before_after.png. CPU, a few minutes.
#   bash run_sdd_toy.sh [OUTPUT_DIR] [extra train_sdd.py flags...]
#   bash run_sdd_toy.sh outputs/toy-sdd-xl --pretrained_model_name_or_path assets/toy-sdxl   # the toy SDXL
#   bash run_sdd_toy.sh outputs/toy-sdd-rb --removing_concepts red blue      # two concepts at once
# Settings: the paper's recipe scaled to the toy model (docs/toy_world.md; found with experiments/sweep_toy.py).
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
export HF_HUB_OFFLINE=1 PYTHONPATH="$HERE${PYTHONPATH:+:$PYTHONPATH}"
OUTPUT_DIR=${1:-$HERE/outputs/toy-sdd}
shift || true
# the base model: assets/toy-sd, or the one a --pretrained_model_name_or_path flag names (e.g. assets/toy-sdxl), which
# the trainer then takes (the last of a repeated flag wins) and the measurement compares against
MODEL="$HERE/assets/toy-sd"
ARGS=("$@") OTHER=()  # OTHER: the flags but the model's (with it alone, an existing result is measured again)
for ((i = 0; i < ${#ARGS[@]}; i++)); do
  case "${ARGS[$i]}" in
    --pretrained_model_name_or_path) MODEL="${ARGS[$((i + 1))]:-$MODEL}"; i=$((i + 1)) ;;
    --pretrained_model_name_or_path=*) MODEL="${ARGS[$i]#*=}" ;;
    *) OTHER+=("${ARGS[$i]}") ;;
  esac
done
if [ -d "$OUTPUT_DIR/unet" ] && [ ${#OTHER[@]} -gt 0 ]; then
  echo "error: $OUTPUT_DIR/unet exists, so the flags ${OTHER[*]} would be ignored; delete the folder or pick another" >&2
  exit 2
elif [ -d "$OUTPUT_DIR/unet" ]; then
  echo "$OUTPUT_DIR/unet exists: skipping training, measuring it again (delete the folder to retrain)"
else
  python "$HERE"/train_sdd.py \
    --pretrained_model_name_or_path "$HERE/assets/toy-sd" \
    --removing_concepts red \
    --num_train_steps 600 \
    --train_batch_size 4 \
    --learning_rate 3e-4 \
    --ema_decay 0.99 \
    --num_ddim_steps 20 \
    --guidance_scale 3.0 \
    --checkpointing_steps 100 \
    --resume_from_checkpoint latest \
    --validation_prompts "a red circle" "an apple" "an orange square" "a blue triangle" \
    --validation_steps 100 \
    --num_validation_images 6 \
    --seed 0 \
    --output_dir "$OUTPUT_DIR" \
    "$@"
fi
python -m utils.toy compare --base "$MODEL" --unet "$OUTPUT_DIR/unet" --output "$OUTPUT_DIR/before_after.png"
