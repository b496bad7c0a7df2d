"""Load a Stable Diffusion pipeline's parts from a hub id or a local folder, with one-line errors."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from utils.cli import UserError


@dataclass
class SDParts:
    """The parts of a Stable Diffusion checkpoint that training needs."""

    tokenizer: CLIPTokenizer
    text_encoder: CLIPTextModel
    vae: AutoencoderKL
    unet: UNet2DConditionModel
    scheduler: DDIMScheduler

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent cell (8 for SD)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def default_resolution(self) -> int:
        """The resolution the U-Net was trained at (512 for SD 1.x)."""
        return self.unet.config.sample_size * self.vae_scale_factor


def _looks_local(name: str) -> bool:
    return os.path.isabs(name) or name.startswith((".", "~")) or os.sep in name.rstrip(os.sep) and name.count("/") != 1


def check_model_source(name: str) -> None:
    """Fail early on a local path that does not exist or is not a pipeline folder."""
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "model_index.json").exists() and not (path / "unet").is_dir():
            raise UserError(f"{name} is not a diffusers pipeline folder (no model_index.json or unet/ inside)")
    elif _looks_local(name):
        raise UserError(f"model folder {name} does not exist")


def from_pretrained(cls, name: str, **kwargs):
    """`cls.from_pretrained` that turns hub/network/missing-file failures into a UserError."""
    path = Path(name).expanduser()
    if path.exists():
        name = str(path)
    try:
        return cls.from_pretrained(name, **kwargs)
    except (OSError, ValueError) as e:
        if path.exists():
            raise UserError(f"could not load {cls.__name__} from {name}: {str(e).splitlines()[0]}") from None
        raise UserError(f"could not download {name!r} from the Hugging Face hub (offline, private or unknown id); "
                        f"pass a local folder made with save_pretrained instead") from None


def load_sd_parts(name: str, revision: str | None = None, variant: str | None = None) -> SDParts:
    """Tokenizer, text encoder, VAE, U-Net and a DDIM scheduler built from the checkpoint's scheduler config."""
    check_model_source(name)
    kw = dict(revision=revision)
    tokenizer = from_pretrained(CLIPTokenizer, name, subfolder="tokenizer", **kw)
    text_encoder = from_pretrained(CLIPTextModel, name, subfolder="text_encoder", variant=variant, **kw)
    vae = from_pretrained(AutoencoderKL, name, subfolder="vae", variant=variant, **kw)
    unet = from_pretrained(UNet2DConditionModel, name, subfolder="unet", variant=variant, **kw)
    sched_config = DDIMScheduler.load_config(name, subfolder="scheduler", revision=revision) if Path(name).expanduser().exists() \
        else from_pretrained(DDIMScheduler, name, subfolder="scheduler", **kw).config
    scheduler = DDIMScheduler.from_config(sched_config)
    return SDParts(tokenizer, text_encoder, vae, unet, scheduler)


def cast(module: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """Move to device, casting only when the dtype changes (diffusers warns on every dtype cast).

    Both in one pass over the tensors, so a full-precision copy of the model never sits on the device.
    """
    if next(module.parameters()).dtype != dtype:
        return module.to(device=device, dtype=dtype)
    return module.to(device)
