"""The toy model in each family's shape: fresh (untrained) modules, how a batch of captions conditions the U-Net, and
the pipeline the trained modules are saved as. The data, VAE and training recipe are shared (utils.toy.train).

- sd: one CLIP text encoder (toy 2 64 wide, toy 3 256; last hidden state) -> cross-attention; a StableDiffusionPipeline.
- sdxl: two CLIP text encoders (CLIPTextModel + CLIPTextModelWithProjection, both on the toy tokenizer, each half the
  text width: 32 + 32 = 64 for toy 2, 128 + 128 = 256 for toy 3) whose penultimate hidden states are concatenated for
  cross-attention, the second one's projected pooled embedding (toy 2: 32; toy 3: its contrastive projection,
  --clip_dim wide) and the 6 time ids (h, w, 0, 0, h, w) as the U-Net's added conditioning (addition_embed_type
  "text_time"); a StableDiffusionXLPipeline.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from utils.toy.render import RESOLUTION

FAMILIES = ("sd", "sdxl")
# SDXL toy: each encoder's width (toy 2's; build_sdxl's text_width / 2), its layers (the penultimate hidden state of
# 3 layers has passed 2, as the sd toy's last of 2), the pooled projection's width (toy 2's; toy 3's is --clip_dim)
# and the width of each time id's sinusoidal embedding
XL_WIDTH, XL_LAYERS, XL_POOLED, XL_TIME_DIM = 32, 3, 32, 8


@dataclass
class ToyModules:
    """The toy model's trainable modules, by pipeline component name (text_encoder_2 only for sdxl)."""

    family: str
    text_encoders: dict[str, torch.nn.Module]
    vae: torch.nn.Module
    unet: torch.nn.Module
    frozen_text: bool = False  # toy 3: the text encoder is trained before the U-Net (contrastively) and frozen

    def trained_with_unet(self) -> dict[str, torch.nn.Module]:
        """The modules the U-Net phase trains, in the order their parameters are optimized."""
        return {"unet": self.unet} if self.frozen_text else {"unet": self.unet, **self.text_encoders}


def _vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64),
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1, norm_num_groups=8, sample_size=RESOLUTION)


ATTENTION = ("low", "all")  # cross-attention levels: 8x8 + mid block (toy 2), or every level + mid block (toy 3)


def _unet(cross_attention_dim: int = 64, attention: str = "low", **extra):
    from diffusers import UNet2DConditionModel

    if attention == "low":
        # cross-attention (and self-attention) at the 8x8 level and in the mid block only: the 16x16 level's
        # attention doubled the CPU cost of a training step without being needed for colour and shape
        down, up = ("DownBlock2D", "CrossAttnDownBlock2D"), ("CrossAttnUpBlock2D", "UpBlock2D")
    else:  # SD's layout: every level with attention has cross-attention (the toy has no attention-free level)
        down, up = ("CrossAttnDownBlock2D",) * 2, ("CrossAttnUpBlock2D",) * 2
    return UNet2DConditionModel(
        sample_size=RESOLUTION // 2, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=down, up_block_types=up, cross_attention_dim=cross_attention_dim, attention_head_dim=4,
        norm_num_groups=8, **extra)


def _clip_config(tokenizer, **kw):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(vocab_size=len(tokenizer), max_position_embeddings=tokenizer.model_max_length,
                          bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                          pad_token_id=tokenizer.pad_token_id, **kw)


def build_sd(tokenizer, seed: int = 0, text_width: int = 64, attention: str = "low",
             frozen_text: bool = False) -> ToyModules:
    """The SD-shaped toy: text encoder (2 layers, `text_width` wide, heads 16 wide), VAE, U-Net with cross-attention at
    `attention`'s levels, created in this order after seeding (the defaults: the shipped assets/toy-sd)."""
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(_clip_config(tokenizer, hidden_size=text_width, intermediate_size=4 * text_width,
                                              num_hidden_layers=2, num_attention_heads=text_width // 16,
                                              projection_dim=text_width))
    vae = _vae()
    return ToyModules("sd", {"text_encoder": text_encoder}, vae, _unet(text_width, attention), frozen_text)


def build_sdxl(tokenizer, seed: int = 0, text_width: int = 2 * XL_WIDTH, attention: str = "low",
               frozen_text: bool = False, pooled: int = XL_POOLED) -> ToyModules:
    """The SDXL-shaped toy: two encoders `text_width / 2` wide (the second with a `pooled`-wide projection), the same
    VAE, and the same U-Net with SDXL's added conditioning (pooled embedding + 6 time ids) and linear attention
    projections, created in this order after seeding (the defaults: the shipped assets/toy-sdxl)."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    width = text_width // 2  # heads 16 wide, as the sd toy's (64 / 4)
    config = _clip_config(tokenizer, hidden_size=width, intermediate_size=4 * width, num_hidden_layers=XL_LAYERS,
                          num_attention_heads=width // 16, projection_dim=pooled)
    encoders = {"text_encoder": CLIPTextModel(config), "text_encoder_2": CLIPTextModelWithProjection(config)}
    vae = _vae()
    unet = _unet(2 * width, attention, use_linear_projection=True, addition_embed_type="text_time",
                 addition_time_embed_dim=XL_TIME_DIM, projection_class_embeddings_input_dim=6 * XL_TIME_DIM + pooled)
    return ToyModules("sdxl", encoders, vae, unet, frozen_text)


def build(family: str, tokenizer, seed: int = 0, **kw) -> ToyModules:
    """Fresh toy modules of `family` (sd or sdxl), seeded; kw: the builder's text width, attention, frozen_text (and
    build_sdxl's pooled width)."""
    return (build_sd if family == "sd" else build_sdxl)(tokenizer, seed, **kw)


def conditioner(m: ToyModules) -> Callable[[torch.Tensor], dict]:
    """ids (batch, length) -> the U-Net's conditioning keyword arguments, as each family's pipeline computes them."""
    if m.family == "sd":  # SD 1.x: the last hidden state
        encoder = m.text_encoders["text_encoder"]
        return lambda ids: {"encoder_hidden_states": encoder(ids)[0]}
    te1, te2 = m.text_encoders["text_encoder"], m.text_encoders["text_encoder_2"]
    size = float(RESOLUTION)
    time_ids = torch.tensor([[size, size, 0.0, 0.0, size, size]])  # original size, crop top-left, target size

    def condition(ids: torch.Tensor) -> dict:
        out1, out2 = te1(ids, output_hidden_states=True), te2(ids, output_hidden_states=True)
        hidden = torch.cat([out1.hidden_states[-2], out2.hidden_states[-2]], dim=-1)
        return {"encoder_hidden_states": hidden,
                "added_cond_kwargs": {"text_embeds": out2.text_embeds, "time_ids": time_ids.expand(len(ids), 6)}}

    return condition


def make_pipeline(m: ToyModules, tokenizer, scheduler):
    """The trained modules as the family's diffusers pipeline (saved with save_pretrained)."""
    from utils.gen.pipelines import StableDiffusionPipeline  # imported without transformers' notices

    if m.family == "sd":
        return StableDiffusionPipeline(vae=m.vae, tokenizer=tokenizer, unet=m.unet, scheduler=scheduler,
                                       safety_checker=None, feature_extractor=None, requires_safety_checker=False,
                                       **m.text_encoders)
    from utils.families import FAMILIES

    # force_zeros_for_empty_prompt False: the unconditional branch is the encoded empty prompt, as the toy was
    # trained with (its captions include the empty one) and as the erasure trainers encode it
    return FAMILIES["sdxl"].pipeline("sd")(vae=m.vae, tokenizer=tokenizer, tokenizer_2=tokenizer, unet=m.unet,
                                            scheduler=scheduler, force_zeros_for_empty_prompt=False,
                                            **m.text_encoders)
