"""A Stable-Diffusion-1.4-shaped pipeline with random weights, for speed and memory benchmarks (no hub needed).

    python -m benchmarks.sd_shaped /tmp/sd14-bench-pipeline
"""
from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path


def build_sd14_pipeline(folder: str | os.PathLike, seed: int = 0) -> Path:
    """Save a Stable-Diffusion-1.4-shaped pipeline with random weights (speed and memory do not depend on them)."""
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from utils.tokenizer import write_clip_tokenizer

    torch.manual_seed(seed)
    folder = Path(folder)
    with tempfile.TemporaryDirectory() as tmp:  # a few real words; ids stay below CLIP's 49408-token vocabulary
        tokenizer = write_clip_tokenizer(tmp, ["a", "photo", "of", "nudity", "naked", "body", "red"], 77)
    text_encoder = CLIPTextModel(CLIPTextConfig(  # ViT-L/14's text tower: 123 M parameters
        vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
        max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8)  # 860 M
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        layers_per_block=2, norm_num_groups=32, sample_size=512)
    scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              num_train_timesteps=1000, set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m benchmarks.sd_shaped FOLDER")
    print(f"saved {build_sd14_pipeline(sys.argv[1])}")
