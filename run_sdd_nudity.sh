#!/usr/bin/env bash
# SDD nudity removal with the paper's settings on one GPU (SD v1.4, cross-attention, 1500 steps, EMA 0.999).
# Usage: bash run_sdd_nudity.sh [OUTPUT_DIR] [extra train_sdd.py flags...]
set -euo pipefail
OUTPUT_DIR=${1:-outputs/sdd-nudity}
shift || true
python train_sdd.py \
  --pretrained_model_name_or_path CompVis/stable-diffusion-v1-4 \
  --removing_concepts prompts/nudity.txt \
  --concept_method iterative \
  --removal_target all \
  --finetuning_method xattn \
  --num_train_steps 1500 \
  --num_ddim_steps 50 \
  --guidance_scale 3.0 \
  --ema_decay 0.999 \
  --learning_rate 1e-5 \
  --weight_decay 1e-4 \
  --max_grad_norm 1.0 \
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
  --eval_with teacher \
  --seed 0 \
  --output_dir "$OUTPUT_DIR" \
  "$@"
