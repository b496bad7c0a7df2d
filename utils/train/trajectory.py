"""Guided DDIM sampling with any weight view, stopped after k of N steps (SDD's z_t), and validation grids; the
model family (utils/families/) calls the denoiser, steps the scheduler and decodes."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from utils.images import image_grid, save_png, to_pil
from utils.seeding import seeded_latents
from utils.families.base import Cond, Family, View


def guided_noise(family: Family, unet: torch.nn.Module, view: View | None, scheduler, z: torch.Tensor,
                 t: torch.Tensor, cond: Cond, uncond: Cond, scale: float) -> torch.Tensor:
    """Classifier-free guidance e = e(z, c_0) + s (e(z, c) - e(z, c_0)), both conditions in one batched forward."""
    b = z.shape[0]
    x = family.scale_input(scheduler, torch.cat([z, z]), t)
    e_0, e_c = family.predict(unet, view, x, t, Cond.cat([uncond.expand(b), cond.expand(b)])).chunk(2)
    return e_0 + scale * (e_c - e_0)


@torch.no_grad()
def ddim_sample(family: Family, unet: torch.nn.Module, view: View | None, scheduler, z: torch.Tensor, cond: Cond,
                uncond: Cond, scale: float, start: int = 0, stop: int | None = None) -> torch.Tensor:
    """Run the guided DDIM steps timesteps[start:stop] (default: all) from z (eta = 0)."""
    for t in scheduler.timesteps[start:stop]:
        e = guided_noise(family, unet, view, scheduler, z, t, cond, uncond, scale)
        z = family.step(scheduler, e, t, z)
    return z


def partial_trajectory(family: Family, unet: torch.nn.Module, view: View | None, scheduler, z_T: torch.Tensor,
                       cond: Cond, uncond: Cond, scale: float, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """z_t after k guided DDIM steps and its timestep t = timesteps[k] (k = 0: z_T itself at the first timestep)."""
    z, t = trajectory_points(family, unet, view, scheduler, z_T, cond, uncond, scale, [k])
    return z, t[0]


@torch.no_grad()
def trajectory_points(family: Family, unet: torch.nn.Module, view: View | None, scheduler, z_T: torch.Tensor,
                      cond: Cond, uncond: Cond, scale: float, ks: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """z at each DDIM step in `ks` of one guided trajectory (max(ks) steps in all), stacked, with their timesteps."""
    timesteps = scheduler.timesteps
    if not all(0 <= k < len(timesteps) for k in ks):
        raise ValueError(f"every k must be in [0, {len(timesteps) - 1}], got {list(ks)}")
    keep, z = {}, z_T
    for i in range(max(ks) + 1):
        if i in ks:
            keep[i] = z
        if i < max(ks):
            z = ddim_sample(family, unet, view, scheduler, z, cond, uncond, scale, start=i, stop=i + 1)
    zs = torch.cat([keep[k] for k in ks])
    ts = torch.cat([timesteps[k].repeat(len(z_T)) for k in ks])
    return zs, ts


@torch.no_grad()
def validation_grid(family: Family, unet: torch.nn.Module, views: dict[str, View | None], scheduler,
                    vae: torch.nn.Module, embeds: dict[str, Cond], prompts: Sequence[str], latent_shape: Sequence[int],
                    device: torch.device, autocast, path: Path, *, n: int, seed: int, scale: float) -> None:
    """Sample n images of each prompt with each view (seed + prompt index, every time) and save one labelled grid."""
    rows, labels = [], []
    was_training = unet.training
    unet.eval()
    for view_name, view in views.items():
        for i, prompt in enumerate(prompts):
            z = seeded_latents(seed + i, (n, *latent_shape), device=device)
            with autocast():
                z = ddim_sample(family, unet, view, scheduler, z, embeds[prompt], embeds[""], scale)
            rows.append(to_pil(family.decode(vae, z)))
            labels.append(f"{view_name}: {prompt}" if len(views) > 1 else prompt)
    unet.train(was_training)
    save_png(image_grid(rows, labels, label_width=160), path)


class TrajectoryQueue:
    """z_t for each micro-step (SDD Alg. 1: k ~ U[0, N-1], z_T ~ N(0, I), k guided DDIM steps of the sampler).

    With `reuse` R > 1, one batch of trajectories serves R micro-steps of its concept: R * M distinct k are drawn at
    once, the teacher runs to the largest, and each of that concept's next R micro-steps trains on M of them (opt-in;
    the sampler is then a few steps stale). R = 1 is the paper's fresh trajectory every micro-step.
    """

    def __init__(self, num_steps: int, samples: int = 1, reuse: int = 1) -> None:
        if samples < 1 or reuse < 1 or samples * reuse > num_steps:
            raise ValueError(f"need 1 <= samples * reuse <= {num_steps}, got samples {samples}, reuse {reuse}")
        self.num_steps, self.samples, self.reuse = num_steps, samples, reuse
        self.queues: dict[str, list[dict]] = {}  # per concept: the micro-steps still to serve

    def next(self, family: Family, unet: torch.nn.Module, view: View | None, scheduler, shape: Sequence[int],
             device: torch.device, embeds: dict[str, Cond], concept: str, uncond: Cond, scale: float,
             generator: torch.Generator) -> dict:
        """{z, t, k (the largest of the micro-step's)} for `concept`; samples R micro-steps' worth when none is left."""
        queue = self.queues.setdefault(concept, [])
        if not queue:
            ks = torch.randperm(self.num_steps, generator=generator)[:self.samples * self.reuse]
            groups = [g.sort().values.tolist() for g in ks.view(self.reuse, self.samples)]
            z_T = seeded_latents(generator, shape, device=device)
            zs, ts = trajectory_points(family, unet, view, scheduler, z_T, embeds[concept], uncond, scale,
                                       [k for g in groups for k in g])
            n = self.samples * len(z_T)
            queue += [dict(z=z, t=t, k=g[-1]) for z, t, g in zip(zs.split(n), ts.split(n), groups)]
        return queue.pop(0)

    def state_dict(self) -> dict:
        """The micro-steps still queued (checkpointed so that a resumed run continues bit for bit)."""
        return {c: [{k: v.cpu() if torch.is_tensor(v) else v for k, v in item.items()} for item in q]
                for c, q in self.queues.items()}

    def load_state_dict(self, state: dict, device: torch.device) -> None:
        """Restore the queued micro-steps."""
        self.queues = {c: [{k: v.to(device) if torch.is_tensor(v) else v for k, v in item.items()} for item in q]
                       for c, q in state.items()}
