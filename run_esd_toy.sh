#!/usr/bin/env bash
# The offline demo: erase the word "red" from the shipped toy model with ESD-x (eta 2, cross-attention),
# then measure the result against the base model, seed for seed: how often red still shows on prompts that name it
# (explicit), on held-out phrasings (paraphrase) and on objects that only imply it (implied: "an apple"), how much of
# orange (red's neighbour) and of the other colours is preserved, shape accuracy and training time; and
# OUTPUT_DIR/before_after.png. CPU, a few minutes.
#   bash run_esd_toy.sh [OUTPUT_DIR] [extra train_esd.py flags...]
#   bash run_esd_toy.sh outputs/toy-esd-xl --pretrained_model_name_or_path assets/toy-sdxl   # the toy SDXL
#   bash run_esd_toy.sh outputs/toy-esd-rb --removing_concepts blue red --concept_steps 200 125 \
#       --num_train_steps 325 --negative_guidance 2 1.5              # two concepts at once, each with its own eta
# Settings: the paper's recipe scaled to the toy model (docs/toy_world.md; found with experiments/sweep_toy.py).
# Several concepts are erased one after another (--concept_method sequential: each concept its --concept_steps, by
# default an even split); with one concept it is the same run as the default iterative schedule.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
export HF_HUB_OFFLINE=1 PYTHONPATH="$HERE${PYTHONPATH:+:$PYTHONPATH}"
OUTPUT_DIR=${1:-$HERE/outputs/toy-esd}
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
  python "$HERE"/train_esd.py \
    --pretrained_model_name_or_path "$HERE/assets/toy-sd" \
    --removing_concepts red \
    --num_train_steps 150 \
    --train_batch_size 4 \
    --learning_rate 1e-4 \
    --num_ddim_steps 20 \
    --guidance_scale 3.0 \
    --negative_guidance 2.0 \
    --concept_method sequential \
    --checkpointing_steps 50 \
    --resume_from_checkpoint latest \
    --validation_prompts "a red circle" "an apple" "an orange square" "a blue triangle" \
    --validation_steps 50 \
    --num_validation_images 6 \
    --seed 0 \
    --output_dir "$OUTPUT_DIR" \
    "$@"
fi
python -m utils.toy compare --base "$MODEL" --unet "$OUTPUT_DIR/unet" --output "$OUTPUT_DIR/before_after.png"
