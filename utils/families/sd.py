"""Stable Diffusion 1.x / 2.x: one CLIP tokenizer and text encoder (last hidden states), a UNet2DConditionModel
conditioned on them alone, a VAE, and DDIM for training's trajectories; SLD and SEGA exist for this family only."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer
from transformers.utils import logging as transformers_logging

from utils.cli import UserError
from utils.families.base import Cond, Family
from utils.loading import check_model_source, from_pretrained

_FROZEN_ENDS = ("time_embedding", "conv_out")  # ESD keeps the time embedding and the output layer fixed


def _edge(name: str) -> bool:
    return name.startswith(_FROZEN_ENDS)


@dataclass
class SDParts:
    """The parts of a Stable Diffusion checkpoint that training needs."""

    tokenizer: CLIPTokenizer
    text_encoder: CLIPTextModel | None
    vae: AutoencoderKL | None
    unet: UNet2DConditionModel
    scheduler: DDIMScheduler

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent cell (8 for SD)."""
        return SD().vae_scale_factor(self)

    @property
    def default_resolution(self) -> int:
        """The resolution the U-Net was trained at (512 for SD 1.x)."""
        return SD().default_resolution(self)


def _pipelines() -> dict[str, type]:
    """diffusers' SD, SLD and SEGA pipelines, imported without transformers' notice (transformers 5 without
    torchvision) that the image processors fall back to their PIL versions: we use no image processor."""
    old = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()
    try:
        from diffusers import SemanticStableDiffusionPipeline, StableDiffusionPipeline, StableDiffusionPipelineSafe
    finally:
        transformers_logging.set_verbosity(old)
    return {"sd": StableDiffusionPipeline, "sld": StableDiffusionPipelineSafe, "sega": SemanticStableDiffusionPipeline}


class SD(Family):
    """SD 1.x / 2.x."""

    name = "sd"
    parts_class = "SDParts"
    pipeline_classes = ("StableDiffusionPipeline", "StableDiffusionPipelineSafe", "SemanticStableDiffusionPipeline")
    SUBSETS = {
        "xattn": lambda n: ".attn2." in n,                                     # cross-attention (SDD and ESD-x)
        "xattn-strict": lambda n: ".attn2.to_k." in n or ".attn2.to_v." in n,  # only the text-facing projections
        "text": lambda n: ".attn2." in n,                                      # all that reads the prompt
        "noxattn": lambda n: ".attn2." not in n and not _edge(n),              # ESD-u
        "selfattn": lambda n: ".attn1." in n,
        "notime": lambda n: not _edge(n),
        "full": lambda n: True,
    }
    PIPELINES = _pipelines()

    def load(self, name: str, revision: str | None = None, variant: str | None = None) -> SDParts:
        """Tokenizer, text encoder, VAE, U-Net and a DDIM scheduler built from the checkpoint's scheduler config."""
        check_model_source(name)
        kw = dict(revision=revision)
        tokenizer = from_pretrained(CLIPTokenizer, name, subfolder="tokenizer", **kw)
        text_encoder = from_pretrained(CLIPTextModel, name, subfolder="text_encoder", variant=variant, **kw)
        vae = from_pretrained(AutoencoderKL, name, subfolder="vae", variant=variant, **kw)
        unet = self.load_unet(name, variant=variant, **kw)
        local = Path(name).expanduser().exists()
        config = DDIMScheduler.load_config(name, subfolder="scheduler", revision=revision) if local \
            else from_pretrained(DDIMScheduler, name, subfolder="scheduler", **kw).config
        return SDParts(tokenizer, text_encoder, vae, unet, DDIMScheduler.from_config(config))

    def load_unet(self, name: str, **kwargs) -> UNet2DConditionModel:
        """The U-Net of a pipeline folder or hub id (subfolder unet/), or of a U-Net folder itself."""
        if (Path(name).expanduser() / "config.json").is_file():
            return from_pretrained(UNet2DConditionModel, name, **kwargs)
        return from_pretrained(UNet2DConditionModel, name, subfolder="unet", **kwargs)

    def load_text(self, tokenizer_path: str | None, text_encoder_path: str | None) -> dict:
        """generate.py's --tokenizer_path / --text_encoder_path: replacement parts from folders."""
        out = {}
        for key, path, cls in (("tokenizer", tokenizer_path, CLIPTokenizer),
                               ("text_encoder", text_encoder_path, CLIPTextModel)):
            if path:
                if not Path(path).expanduser().is_dir():
                    raise UserError(f"--{key}_path {path} is not a folder")
                out[key] = from_pretrained(cls, path)
        return out

    @torch.no_grad()
    def encode_hidden(self, tokenizer, text_encoder, prompts: Sequence[str], device: torch.device,
                      batch_size: int = 32) -> torch.Tensor:
        """Last hidden states of the CLIP text encoder, padded to the tokenizer's length, as the SD pipelines do."""
        out = []
        for i in range(0, len(prompts), batch_size):
            ids = tokenizer(list(prompts[i:i + batch_size]), padding="max_length",
                            max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt").input_ids
            out.append(text_encoder(ids.to(text_encoder.device))[0].to(device))
        return torch.cat(out)

    def encode(self, parts: SDParts, prompts: Sequence[str], device: torch.device,
               size: tuple[int, int] | None = None) -> dict[str, Cond]:
        """Condition (1, L, D) for each distinct prompt, computed in one pass (SD takes no size conditioning)."""
        unique = list(dict.fromkeys(prompts))
        emb = self.encode_hidden(parts.tokenizer, parts.text_encoder, unique, device)
        return {p: Cond(emb[i:i + 1]) for i, p in enumerate(unique)}

    def caption_cond(self, parts: SDParts, captions: Sequence[str], device: torch.device,
                     size: tuple[int, int] | None = None, runs: Sequence[Callable] | None = None) -> Cond:
        """Last hidden states (B, L, D) of the captions, with gradients (runs[0] in place of the text encoder)."""
        tok, run = parts.tokenizer, runs[0] if runs else parts.text_encoder
        ids = tok(list(captions), padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids
        return Cond(run(ids.to(parts.text_encoder.device))[0].to(device))

    def free_text(self, parts: SDParts) -> None:
        """Drop the text encoder (the tokenizer is kept: it is small)."""
        parts.text_encoder = None

    def pipeline(self, mode: str) -> type:
        """StableDiffusionPipeline (sd), StableDiffusionPipelineSafe (sld), SemanticStableDiffusionPipeline (sega)."""
        if mode not in self.PIPELINES:
            raise UserError(f"--pipeline_type {mode} does not exist for {self.name} models "
                            f"(choose from {', '.join(self.PIPELINES)})")
        return self.PIPELINES[mode]
