"""Guided DDIM sampling with any weight view, stopped after k of N steps (SDD's z_t), and latent decoding."""
from __future__ import annotations

from typing import Sequence

import torch

from utils.views import View, call


def guided_noise(unet: torch.nn.Module, view: View | None, z: torch.Tensor, t: torch.Tensor, cond: torch.Tensor,
                 uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance e = e(z, c_0) + s (e(z, c) - e(z, c_0)), both conditions in one batched forward."""
    b = z.shape[0]
    emb = torch.cat([uncond.expand(b, -1, -1), cond.expand(b, -1, -1)])
    out = call(unet, view, torch.cat([z, z]), t, encoder_hidden_states=emb).sample
    e_0, e_c = out.chunk(2)
    return e_0 + scale * (e_c - e_0)


@torch.no_grad()
def ddim_sample(unet: torch.nn.Module, view: View | None, scheduler, z: torch.Tensor, cond: torch.Tensor,
                uncond: torch.Tensor, scale: float, start: int = 0, stop: int | None = None) -> torch.Tensor:
    """Run the guided DDIM steps timesteps[start:stop] (default: all) from z (eta = 0)."""
    for t in scheduler.timesteps[start:stop]:
        e = guided_noise(unet, view, z, t, cond, uncond, scale)
        z = scheduler.step(e, t, z).prev_sample.to(z.dtype)
    return z


def partial_trajectory(unet: torch.nn.Module, view: View | None, scheduler, z_T: torch.Tensor, cond: torch.Tensor,
                       uncond: torch.Tensor, scale: float, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """z_t after k guided DDIM steps and its timestep t = timesteps[k] (k = 0: z_T itself at the first timestep)."""
    z, t = trajectory_points(unet, view, scheduler, z_T, cond, uncond, scale, [k])
    return z, t[0]


@torch.no_grad()
def trajectory_points(unet: torch.nn.Module, view: View | None, scheduler, z_T: torch.Tensor, cond: torch.Tensor,
                      uncond: torch.Tensor, scale: float, ks: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """z at each DDIM step in `ks` of one guided trajectory (max(ks) steps in all), stacked, with their timesteps."""
    timesteps = scheduler.timesteps
    if not all(0 <= k < len(timesteps) for k in ks):
        raise ValueError(f"every k must be in [0, {len(timesteps) - 1}], got {list(ks)}")
    keep, z = {}, z_T
    for i in range(max(ks) + 1):
        if i in ks:
            keep[i] = z
        if i < max(ks):
            z = ddim_sample(unet, view, scheduler, z, cond, uncond, scale, start=i, stop=i + 1)
    zs = torch.cat([keep[k] for k in ks])
    ts = torch.cat([timesteps[k].repeat(len(z_T)) for k in ks])
    return zs, ts


def jitter_timestep(t: torch.Tensor, scheduler, generator: torch.Generator) -> torch.Tensor:
    """A DDPM timestep drawn uniformly from t's DDIM bucket (t - stride, t], stride = T / N."""
    stride = scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    offset = torch.randint(0, stride, t.shape, generator=generator).to(t.device)
    return (t - offset).clamp(min=0)


@torch.no_grad()
def decode_latents(vae: torch.nn.Module, z: torch.Tensor) -> torch.Tensor:
    """Latents -> images in [0, 1], (B, 3, H, W), float32 on the CPU."""
    x = vae.decode(z.to(vae.dtype) / vae.config.scaling_factor).sample
    return (x.float() / 2 + 0.5).clamp(0, 1).cpu()
