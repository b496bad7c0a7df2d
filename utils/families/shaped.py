"""Full-shape pipelines with random weights, for speed and memory benchmarks (no hub needed): SD 1.4's shape, and
SDXL base's shape at a chosen width (1.0 is SDXL base: a 2.57 B U-Net; 0.5 keeps its levels, transformer depths,
heads and conditioning at a quarter of the parameters)."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch
from diffusers import AutoencoderKL, EulerDiscreteScheduler, PNDMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from utils.families.sd import SD
from utils.families.sdxl import SDXL
from utils.tokenizer import write_clip_tokenizer

WORDS = ["a", "photo", "of", "nudity", "naked", "body", "red"]  # a few real words; ids stay below CLIP's vocabulary
BETAS = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000, steps_offset=1)


def _tokenizer():
    with tempfile.TemporaryDirectory() as tmp:
        return write_clip_tokenizer(tmp, WORDS, 77)


def _clip(tokenizer, width: int, layers: int, heads: int, cls=CLIPTextModel, act: str = "quick_gelu"):
    return cls(CLIPTextConfig(vocab_size=49408, hidden_size=width, intermediate_size=4 * width,
                              num_hidden_layers=layers, num_attention_heads=heads, max_position_embeddings=77,
                              hidden_act=act, projection_dim=width, bos_token_id=tokenizer.bos_token_id,
                              eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))


def _vae(blocks: int = 4, sample_size: int = 512) -> AutoencoderKL:
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
                         down_block_types=("DownEncoderBlock2D",) * blocks, up_block_types=("UpDecoderBlock2D",) * blocks,
                         layers_per_block=2, norm_num_groups=32, sample_size=sample_size)


def sd_unet(**config) -> UNet2DConditionModel:
    """A U-Net of SD 1.x's shape (diffusers' defaults) with `config`'s changes (e.g. on the meta device, to count)."""
    return UNet2DConditionModel(**config)


def build_sd14_pipeline(folder: str | os.PathLike, seed: int = 0) -> Path:
    """Save an SD-1.4-shaped pipeline: ViT-L/14's text tower (123 M), an 860 M U-Net, SD's VAE."""
    torch.manual_seed(seed)
    tokenizer = _tokenizer()
    unet = sd_unet(sample_size=64, cross_attention_dim=768, attention_head_dim=8)
    scheduler = PNDMScheduler(set_alpha_to_one=False, skip_prk_steps=True, **BETAS)
    pipe = SD.PIPELINES["sd"](vae=_vae(), text_encoder=_clip(tokenizer, 768, 12, 12), tokenizer=tokenizer, unet=unet,
                              scheduler=scheduler, safety_checker=None, feature_extractor=None,
                              requires_safety_checker=False)
    pipe.save_pretrained(folder, safe_serialization=True)
    return Path(folder)


def build_sdxl_pipeline(folder: str | os.PathLike, width: float = 1.0, seed: int = 0) -> Path:
    """Save an SDXL-base-shaped pipeline at `width` times SDXL's channels: CLIP-L and CLIP-G (penultimate states
    concatenated, G's projected pooled embedding), a U-Net with 1/2/10 transformer layers per level and text_time
    conditioning, SDXL's VAE; Euler, as SDXL base ships."""
    torch.manual_seed(seed)
    w = lambda n: int(round(n * width))  # noqa: E731
    tokenizer = _tokenizer()
    clip_l = _clip(tokenizer, w(768), 12, 12)
    clip_g = _clip(tokenizer, w(1280), 32, 20, CLIPTextModelWithProjection, act="gelu")
    time_dim = w(256)
    unet = UNet2DConditionModel(
        sample_size=128, block_out_channels=(w(320), w(640), w(1280)), layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), use_linear_projection=True,
        cross_attention_dim=w(768) + w(1280), addition_embed_type="text_time", addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=6 * time_dim + w(1280))
    vae = _vae(sample_size=1024)
    vae.register_to_config(scaling_factor=0.13025)
    pipe = SDXL.PIPELINES["sd"](vae=vae, text_encoder=clip_l, text_encoder_2=clip_g, tokenizer=tokenizer,
                                tokenizer_2=tokenizer, unet=unet, scheduler=EulerDiscreteScheduler(**BETAS),
                                force_zeros_for_empty_prompt=True)
    pipe.save_pretrained(folder, safe_serialization=True)
    return Path(folder)
