"""The reference code's training layout for SDD and ESD, restated for benchmarks (not for training runs).

What the reference (nannullna/safe-diffusion, train_sdd.py / train_esd.py) holds and does, and this loop copies:
  * two full U-Nets: SDD's teacher is a full copy updated by EMA over *every* U-Net parameter
    (`ema.mul_(m).add_(student, alpha=1 - m)` per tensor); ESD's frozen original is a full copy;
  * the text encoder(s) and the VAE stay loaded; "", c_p and c_s are re-encoded every step (three passes);
  * the teacher (SDD) or the student (ESD) samples z_t with k batched CFG steps of DDIM (eta = 0);
  * SDD loss mse(sg(e_student(z_t, c_0)), e_student(z_t, c_s)); ESD loss
    mse(e_student(z_t, c), e_0 - eta (e_c - e_0)) with e_0, e_c from two forwards of the original;
  * AdamW over the trained subset, optional gradient clipping, fp32 weights under autocast for mixed precision.

Kept equal to our trainer so that both layouts do the same work: k, z_T and the timestep are drawn from the same
seeded generator in the same order (the reference draws k with the global RNG; same distribution), exactly k DDIM
steps are run (the reference runs all N when k = 0), and c_p / c_s follow our --concept_method /
--sampling_concept / --removal_target.
Deliberately in the reference's favour: the student's frozen parameters do not require grad (`grads="subset"`);
the reference code leaves them trainable, which adds a full set of U-Net gradients (`grads="all"`).
On the CPU the loaded weights are copied out of their safetensors memory map, as `.to("cuda")` copies them, so that
the resident set counts the VAE and text encoder that the reference keeps loaded but barely touches.
tests/test_benchmarks.py checks that this loop and our trainer give the same losses step by step.
"""
from __future__ import annotations

import argparse
import copy
import time

import torch
import torch.nn.functional as F
from diffusers.optimization import get_scheduler

from utils.cli import DTYPES, resolve_device
from utils.families import Cond, family_of
from utils.text import read_word_list
from utils.train.concepts import concept_schedule, per_concept_value, step_prompts

GRADS = ("subset", "all")


def _sync(device: torch.device) -> float:
    """Wait for the device, then return the time."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _materialize(module: torch.nn.Module) -> None:
    """Copy weights that are still memory-mapped from the checkpoint into process memory, as `.to("cuda")` would.

    On the CPU, safetensors weights are mapped lazily and count as resident only once touched; the reference keeps
    its VAE (and most of the token embedding) loaded but never touches them, which a GPU would still hold.
    """
    with torch.no_grad():
        for p in list(module.parameters()) + list(module.buffers()):
            p.data = p.data.clone()


class ReferenceLayout:
    """One SDD or ESD training run laid out like the reference code; `step()` runs one optimizer step."""

    def __init__(self, args: argparse.Namespace, grads: str = "subset") -> None:
        if grads not in GRADS:
            raise ValueError(f"grads must be one of {GRADS}, got {grads!r}")
        self.args, self.method = args, args.method
        self.device = resolve_device(args.device)
        self.dtype = DTYPES[args.mixed_precision]
        self.concepts = read_word_list(args.removing_concepts, "concepts (--removing_concepts)")
        torch.manual_seed(args.seed)
        name = args.pretrained_model_name_or_path
        self.family = family = family_of(name)
        self.parts = parts = family.load(name)  # tokenizer(s), text encoder(s), VAE, U-Net, DDIM from its config
        self.text_encoders = [e.requires_grad_(False) for e in family.text_encoders(parts)]
        self.vae = parts.vae.requires_grad_(False)  # loaded, never used
        self.student = parts.unet
        self.frozen = copy.deepcopy(self.student).requires_grad_(False)  # SDD: EMA teacher; ESD: original
        pick = family.SUBSETS[args.finetuning_method]
        self.params = [p for n, p in self.student.named_parameters() if pick(n)]
        if grads == "subset":
            self.student.requires_grad_(False)
            for p in self.params:
                p.requires_grad_(True)
        for m in (*self.text_encoders, self.vae, self.student, self.frozen):
            m.to(self.device)
            if self.device.type == "cpu":
                _materialize(m)
        if args.gradient_checkpointing:
            self.student.enable_gradient_checkpointing()
        self.optimizer = torch.optim.AdamW(self.params, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                                           eps=args.adam_epsilon, weight_decay=args.weight_decay)
        self.lr_scheduler = get_scheduler(args.lr_scheduler, self.optimizer, num_warmup_steps=args.lr_warmup_steps,
                                          num_training_steps=args.num_train_steps)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16)
        self.scheduler = parts.scheduler
        self.scheduler.set_timesteps(args.num_ddim_steps, device=self.device)
        self.latent_shape = family.latent_shape(parts, args.resolution)
        self.size = tuple(n * family.vae_scale_factor(parts) for n in self.latent_shape[1:])
        self.schedule = concept_schedule(self.concepts, args.concept_method, args.num_train_steps, args.seed)
        self.generator = torch.Generator().manual_seed(args.seed)
        self.step_count = 0

    def result(self) -> torch.nn.Module:
        """The trained model: SDD's EMA teacher, ESD's student."""
        return self.frozen if self.method == "sdd" else self.student

    @torch.no_grad()
    def encode(self, prompt: str) -> Cond:
        """One text-encoder pass (the reference encodes "", c_p and c_s separately every step)."""
        return self.family.encode(self.parts, [prompt], self.device, self.size)[prompt]

    @torch.no_grad()
    def sample_until(self, unet: torch.nn.Module, latents: torch.Tensor, k: int, uncond: Cond, cond: Cond) -> torch.Tensor:
        """k guided DDIM steps from z_T: both conditions in one batch, as the reference's sample_until."""
        both = Cond.cat([uncond.expand(len(latents)), cond.expand(len(latents))])
        for t in self.scheduler.timesteps[:k]:
            x = self.scheduler.scale_model_input(torch.cat([latents] * 2), t)
            e_0, e_c = self.family.predict(unet, None, x, t, both).chunk(2)
            latents = self.scheduler.step(e_0 + self.args.guidance_scale * (e_c - e_0), t, latents).prev_sample
        return latents

    def _micro_step(self, c_p: str, c_s: str, phases: dict) -> tuple[torch.Tensor, int]:
        a, dev = self.args, self.device
        t0 = _sync(dev)
        c_0, c_p_emb, c_s_emb = self.encode(""), self.encode(c_p), self.encode(c_s)
        t1 = _sync(dev)
        k = int(torch.randperm(a.num_ddim_steps, generator=self.generator)[0])
        z = torch.randn((a.train_batch_size, *self.latent_shape), generator=self.generator).to(dev)
        z = z * self.scheduler.init_noise_sigma
        sampler = self.frozen if self.method == "sdd" else self.student
        z = self.sample_until(sampler, z, k, c_0, c_p_emb)
        t = self.scheduler.timesteps[k].repeat(len(z))
        if a.timestep_jitter:
            t = self.family.jitter(t, self.scheduler, self.generator)
        t2 = _sync(dev)
        n, predict = len(z), self.family.predict
        if self.method == "sdd":
            with torch.no_grad():
                e_0 = predict(self.student, None, z, t, c_0.expand(n))
            e_s = predict(self.student, None, z, t, c_s_emb.expand(n))
            loss = F.mse_loss(e_0.detach(), e_s)
        else:
            with torch.no_grad():
                e_0 = predict(self.frozen, None, z, t, c_0.expand(n))
                e_c = predict(self.frozen, None, z, t, c_p_emb.expand(n))
                eta = per_concept_value(a.negative_guidance, self.concepts, c_p)  # one eta, or one per concept
                target = e_0 - eta * (e_c - e_0)
            e_s = predict(self.student, None, z, t, c_p_emb.expand(n))
            loss = F.mse_loss(e_s, target)
        phases["text"] += t1 - t0
        phases["sample"] += t2 - t1
        phases["train"] += _sync(dev) - t2
        return loss, k

    def step(self) -> dict:
        """One optimizer step; returns the loss, the last k and seconds per phase (text, sample, train, ema)."""
        a, dev = self.args, self.device
        phases = dict(text=0.0, sample=0.0, train=0.0, ema=0.0)
        c_p, c_s = step_prompts(self.schedule[self.step_count], self.concepts, getattr(a, "sampling_concept", "current"),
                                getattr(a, "removal_target", "all"))  # SDD: (sampling prompt, removal target)
        self.student.train()
        self.optimizer.zero_grad()
        total, k = 0.0, 0
        for _ in range(a.gradient_accumulation_steps):
            with torch.autocast(dev.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
                loss, k = self._micro_step(c_p, c_s, phases)
            t2 = _sync(dev)
            self.scaler.scale(loss / a.gradient_accumulation_steps).backward()
            total += loss.item() / a.gradient_accumulation_steps
            phases["train"] += _sync(dev) - t2
        t3 = _sync(dev)
        if a.max_grad_norm > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.params, a.max_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.lr_scheduler.step()
        t4 = _sync(dev)
        if self.method == "sdd":
            m = a.ema_decay
            with torch.no_grad():
                for param, ema_param in zip(self.student.parameters(), self.frozen.parameters()):
                    ema_param.data.mul_(m).add_(param.data, alpha=1 - m)
        t5 = _sync(dev)
        phases["train"] += t4 - t3
        phases["ema"] += t5 - t4
        self.step_count += 1
        return dict(step=self.step_count, loss=total, k=k, phases=phases)
