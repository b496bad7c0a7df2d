#!/usr/bin/env bash
# SDD nudity removal with the paper's settings (SD v1.4, cross-attention, 1500 steps, EMA 0.999, s_g 3, fp32).
# Usage: bash run_sdd_nudity.sh [OUTPUT_DIR] [extra train_sdd.py flags...]
# Small GPU: frozen weights in bf16 and activations recomputed (peak 3.40 GiB instead of 6.39 GiB in fp32, measured
# on the CPU at 512 px; docs/performance.md); no longer the paper's fp32 run:
#   bash run_sdd_nudity.sh outputs/sdd-nudity-bf16 --mixed_precision bf16 --gradient_checkpointing
# Rerunning the same command continues from the newest checkpoint; other flags into the same folder are refused.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)  # runs from any folder
OUTPUT_DIR=${1:-$HERE/outputs/sdd-nudity}
shift || true
python "$HERE"/train_sdd.py \
  --pretrained_model_name_or_path CompVis/stable-diffusion-v1-4 \
  --removing_concepts "$HERE"/prompts/nudity.txt \
  --concept_method iterative \
  --sampling_concept current \
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
  --mixed_precision no \
  --checkpointing_steps 250 \
  --checkpoints_total_limit 2 \
  --resume_from_checkpoint latest \
  --validation_prompts "$HERE"/prompts/validation_body.txt \
  --validation_steps 250 \
  --num_validation_images 2 \
  --eval_with teacher \
  --seed 42 \
  --output_dir "$OUTPUT_DIR" \
  "$@"
