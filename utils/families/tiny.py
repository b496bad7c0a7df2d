"""Tiny SD- and SDXL-shaped pipelines built in code (random weights), for tests and benchmarks."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, PNDMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from utils.families.sd import SD  # its pipelines are imported without transformers' torchvision notice
from utils.families.sdxl import SDXL
from utils.tokenizer import write_clip_tokenizer

TINY_WORDS = ["a", "photo", "of", "nudity", "nude", "naked", "body", "red", "circle", "green", "square", "cat", "dog"]


def tiny_unet(cross_attention_dim: int = 32, sample_size: int = 8, prediction_type_hint: str | None = None) -> UNet2DConditionModel:
    """A two-level U-Net with one cross-attention block per level."""
    return UNet2DConditionModel(
        sample_size=sample_size, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(16, 32), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=cross_attention_dim,
        attention_head_dim=4, norm_num_groups=8,
    )


def build_tiny_pipeline(folder: str | os.PathLike, prediction_type: str = "epsilon", seed: int = 0,
                        scheduler: str = "pndm", sample_size: int = 8) -> Path:
    """Save a tiny StableDiffusionPipeline (U-Net, VAE, CLIP text encoder, tokenizer from our own files) to `folder`."""
    torch.manual_seed(seed)
    folder = Path(folder)
    unet = tiny_unet(sample_size=sample_size)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        layers_per_block=1, norm_num_groups=8, sample_size=sample_size * 2)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = write_clip_tokenizer(tmp, TINY_WORDS, model_max_length=16)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=tokenizer.model_max_length, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    sched_kwargs = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                        prediction_type=prediction_type, steps_offset=1)
    sched = (PNDMScheduler(skip_prk_steps=True, **sched_kwargs) if scheduler == "pndm"
             else DDIMScheduler(clip_sample=False, set_alpha_to_one=False, **sched_kwargs))
    pipe = SD.PIPELINES["sd"](vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=sched, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def tiny_sdxl_unet(sample_size: int = 8, text_width: int = 32, time_dim: int = 8,
                   cross_attention_dim: int | None = None) -> UNet2DConditionModel:
    """A two-level SDXL-shaped U-Net: cross-attention on two encoders' states (default width 2 x text_width), a
    text_width-wide pooled embedding and 6 time ids."""
    return UNet2DConditionModel(
        sample_size=sample_size, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=cross_attention_dim or 2 * text_width, attention_head_dim=4, norm_num_groups=8,
        use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=6 * time_dim + text_width)


def build_tiny_sdxl_pipeline(folder: str | os.PathLike, seed: int = 0, sample_size: int = 8,
                             widths: tuple[int, int] = (32, 32)) -> Path:
    """Save a tiny StableDiffusionXLPipeline (two CLIP encoders of these widths, the second with a 32-wide
    projection; Euler, as SDXL base ships) to `folder`."""
    from diffusers import EulerDiscreteScheduler
    from transformers import CLIPTextModelWithProjection

    torch.manual_seed(seed)
    folder = Path(folder)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = write_clip_tokenizer(tmp, TINY_WORDS, model_max_length=16)
    config, config_2 = (CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=width, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=tokenizer.model_max_length, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, projection_dim=32)
        for width in widths)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        layers_per_block=1, norm_num_groups=8, sample_size=sample_size * 2)
    sched = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                   num_train_timesteps=1000, steps_offset=1, timestep_spacing="leading")
    pipe = SDXL.PIPELINES["sd"](vae=vae, text_encoder=CLIPTextModel(config), tokenizer=tokenizer,
                                     text_encoder_2=CLIPTextModelWithProjection(config_2), tokenizer_2=tokenizer,
                                     unet=tiny_sdxl_unet(sample_size, cross_attention_dim=sum(widths)), scheduler=sched,
                                     force_zeros_for_empty_prompt=True)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder
