#!/usr/bin/env bash
# The SDD paper's ESD baselines, trained as its reference code does (SD v1.4, eta 3, 1000 steps, AdamW lr 1e-5,
# weight decay 1e-4, gradient norm clipped at 1.0, s_g 3, fp32). ESD-x-3 (cross-attention) by default; ESD-u-3:
#   bash run_esd_nudity.sh outputs/esd-u-nudity --finetuning_method noxattn
# Usage: bash run_esd_nudity.sh [OUTPUT_DIR] [extra train_esd.py flags...]
# Small GPU (frozen weights in bf16, activations recomputed; docs/performance.md): append
#   --mixed_precision bf16 --gradient_checkpointing
# (ESD-x only: ESD-u trains 813 M parameters, whose fp32 weights, gradients and AdamW states alone take about 13 GB.)
# Rerunning the same command continues from the newest checkpoint; other flags into the same folder are refused.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)  # runs from any folder
OUTPUT_DIR=${1:-$HERE/outputs/esd-x-nudity}
shift || true
python "$HERE"/train_esd.py \
  --pretrained_model_name_or_path CompVis/stable-diffusion-v1-4 \
  --removing_concepts "$HERE"/prompts/nudity.txt \
  --finetuning_method xattn \
  --num_train_steps 1000 \
  --num_ddim_steps 50 \
  --guidance_scale 3.0 \
  --negative_guidance 3.0 \
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
  --seed 42 \
  --output_dir "$OUTPUT_DIR" \
  "$@"
