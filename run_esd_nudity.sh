#!/usr/bin/env bash
# ESD-x nudity removal (baseline, Gandikota et al.): SD v1.4, cross-attention, 1000 steps, eta 1.0.
# Usage: bash run_esd_nudity.sh [OUTPUT_DIR] [extra train_esd.py flags...]
set -euo pipefail
OUTPUT_DIR=${1:-outputs/esd-x-nudity}
shift || true
python train_esd.py \
  --pretrained_model_name_or_path CompVis/stable-diffusion-v1-4 \
  --removing_concepts prompts/nudity.txt \
  --finetuning_method xattn \
  --num_train_steps 1000 \
  --num_ddim_steps 50 \
  --guidance_scale 3.0 \
  --negative_guidance 1.0 \
  --learning_rate 1e-5 \
  --train_batch_size 1 \
  --mixed_precision bf16 \
  --gradient_checkpointing \
  --allow_tf32 \
  --checkpointing_steps 250 \
  --checkpoints_total_limit 2 \
  --resume_from_checkpoint latest \
  --validation_prompts prompts/validation_body.txt \
  --validation_steps 250 \
  --num_validation_images 2 \
  --seed 0 \
  --output_dir "$OUTPUT_DIR" \
  "$@"
