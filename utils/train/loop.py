"""The training loop shared by SDD and ESD: the method protocol, one Run (setup, step, finish), saving.

A method (see train_sdd.py / train_esd.py) owns its flags and checks, and says which prompts a step uses, which
weights sample z_t, what the loss is, what happens after an optimizer step and which weights are the result; the
loop reads none of its flags. Everything else lives here once: the shared flags in utils/train/args.py, the
preservation term the loop adds to any method's loss in utils/train/preserve.py, checks, checkpoints, the same-run
check on resume and signals in utils/train/checkpoints.py, trajectories in utils/train/trajectory.py, and what is
specific to the model (encoders, the denoiser call, the scheduler step) in its family (utils/families/).
"""
from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Protocol

import torch
from tqdm.auto import tqdm

from utils.cli import DTYPES, UserError, apply_threads, resolve_device, setup_logging
from utils.families import Cond, Family, describe, family_of
from utils.lora import describe_export, export_lora
from utils.loading import cast
from utils.saving import atomic_dir, atomic_write_text, save_erasure
from utils.train.checkpoints import (StopOnSignal, TrainState, check_run_args, checkpoint_step, clear_run,
                                     load_checkpoint, save_checkpoint)
from utils.train.concepts import concept_schedule, joined
from utils.train.convtune import autotune_convolutions, choices
from utils.train.optim import autocast_to, make_adamw, step_in_backward
from utils.train.preserve import Preservation
from utils.train.trajectory import TrajectoryQueue, validation_grid
from utils.train.views import View, snapshot, swapped_in

log = logging.getLogger("sdd")


# ----------------------------------------------------------------------------------------------- methods
@dataclass
class Batch:
    """What a method sees each micro-step: z_t at DDIM step k, its timestep, the cached embeddings and c_p's text."""

    z: torch.Tensor
    t: torch.Tensor
    k: int
    c_0: Cond
    c_p: Cond
    c_s: Cond
    concept: str
    weight: torch.Tensor | None = None  # per-sample weight of the squared error (--loss_space epsilon)


def output_mse(a: torch.Tensor, b: torch.Tensor, batch: Batch) -> torch.Tensor:
    """Mean squared error of two U-Net outputs, weighted per sample when --loss_space epsilon asks for it."""
    err = (a.float() - b.float()) ** 2
    return torch.mean(err if batch.weight is None else batch.weight * err)


class Method(Protocol):
    """The few lines in which SDD and ESD differ (built with a Setup, after `check` passed)."""

    name: str
    neutral_flags: frozenset[str]        # its flags that do not change what is learned (not checked on resume)
    sampler: View | None                 # weights that sample z_t (None: the live student)
    result: View                         # the weights saved at the end

    @classmethod
    def check(cls, args: argparse.Namespace, concepts: list[str]) -> None: ...  # UserError before any write
    def prompts(self, c_p: str) -> tuple[str, str]: ...  # (prompt that samples z_t, prompt c_s) for concept c_p
    def loss(self, unet: torch.nn.Module, batch: Batch) -> torch.Tensor: ...
    def after_step(self) -> None: ...
    def eval_views(self) -> dict[str, View | None]: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: Mapping) -> None: ...


@dataclass
class Setup:
    """Everything a method needs to build itself."""

    family: Family
    unet: torch.nn.Module
    subset: dict[str, torch.nn.Parameter]
    args: argparse.Namespace
    concepts: list[str]
    _original: dict | None = field(default=None, repr=False)

    def original(self) -> dict[str, torch.Tensor]:
        """The trained subset's starting values, frozen: copied on the first call only (memory), then shared by all
        who ask (ESD's target, SDD's --uncond_from original, the preservation term)."""
        if self._original is None:
            self._original = snapshot(self.subset)
        return self._original


# ----------------------------------------------------------------------------------------------- the loop
def train(args: argparse.Namespace, method: type[Method]) -> Path:
    """Run one erasure: load, train `method`'s objective, save unet/ and erasure.safetensors; returns output_dir.

    Stopped by SIGINT/SIGTERM it saves a checkpoint and raises utils.cli.Stopped (exit 130/143, the resume hint last).
    """
    run = Run(args, method)
    bar = tqdm(total=args.num_train_steps, initial=run.step, desc=run.method.name, dynamic_ncols=True)
    run.logger.info("training starts at step %d of %d", run.step, args.num_train_steps)  # benchmarks time from here
    t_start = time.time()
    with StopOnSignal() as stop:
        while run.step < args.num_train_steps and not stop.raised:
            loss, c_p, k = run.train_step()
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4g}", concept=c_p[:20], k=k)
            run.checkpoint_and_validate(stopping=stop.raised)
        bar.close()
        if run.step < args.num_train_steps:
            if run.step and (run.last_ckpt is None or checkpoint_step(run.last_ckpt) != run.step):
                run.checkpoint_and_validate(stopping=True)  # the signal came while a validation grid was drawn
            stopped = stop.stopped(run.step, args.num_train_steps, run.last_ckpt, run.out,
                                   args.resume_from_checkpoint == "latest")
            run.logger.info(str(stopped))
            raise stopped
        run.logger.info("trained %d steps in %.1f s", args.num_train_steps, time.time() - t_start)
        stop.action = "writing the result first"  # a signal now waits for the result (a second one stops at once)
        return run.finish()


class Run:
    """One training run's state: built by __init__ (checks, loading, optimizer, resume), advanced by train_step."""

    def __init__(self, args: argparse.Namespace, method: type[Method]) -> None:
        self.args, self.out = args, Path(args.output_dir)
        self.concepts, self.val_prompts, self.preserve_prompts, resume, self.identity = check_run_args(args, method)
        self.device = resolve_device(args.device)
        self.dtype = DTYPES[args.mixed_precision]
        threads = apply_threads(args.threads, self.device)
        if args.allow_tf32 and self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        torch.manual_seed(args.seed)
        self.family = family_of(args.pretrained_model_name_or_path)
        self.parts = self.family.load(args.pretrained_model_name_or_path, args.revision, args.variant)
        self.latent_shape = self.family.latent_shape(self.parts, args.resolution)
        if resume is None and args.overwrite_output_dir:  # the old run goes now, or its checkpoints mix with ours
            clear_run(self.out)
        self.logger = setup_logging(self.out, "train.log")
        if resume is None:  # a resumed run keeps the args.json of its start; train.log records every invocation
            atomic_write_text(self.out / "args.json", json.dumps(vars(args), indent=2, default=str))
        self.logger.info("args %s", json.dumps(vars(args), default=str))
        self.logger.info("device %s, %d torch threads", self.device, threads)
        self._prepare_model(method)
        self.step, self.last_ckpt = 0, resume
        if resume is not None:
            self.step = load_checkpoint(resume, self.state, self.device)
            if self.step > args.num_train_steps:
                raise UserError(f"{resume} is at step {self.step}, past --num_train_steps {args.num_train_steps}")
            self.logger.info("resumed from %s at step %d", resume, self.step)
            print(f"resumed from {resume} at step {self.step}")
        elif args.resume_from_checkpoint == "latest":
            self.logger.info("no checkpoint in %s: starting a new run", self.out)
        self._autotune()

    def _prepare_model(self, method: type[Method]) -> None:
        """Encode text once, free what training does not need, cast, pick the trained subset, build the optimizer."""
        args, parts, device, dtype, family = self.args, self.parts, self.device, self.dtype, self.family
        # text is encoded once (c_0 = "", the concepts, their joined string, validation prompts); then the text
        # encoder is freed. The VAE is kept only to decode validation images.
        for encoder in family.text_encoders(parts):
            cast(encoder, device, dtype)
        size = tuple(n * family.vae_scale_factor(parts) for n in self.latent_shape[1:])
        self.embeds = family.encode(parts, ["", joined(self.concepts), *self.concepts, *self.val_prompts,
                                            *self.preserve_prompts], device, size)
        if args.empty_prompt == "zeros":  # c_0 as SDXL's pipeline makes an empty negative prompt
            self.embeds[""] = family.zeroed(self.embeds[""])
        family.free_text(parts)
        if self.val_prompts:
            parts.vae.encoder = None
            cast(parts.vae, device, dtype).requires_grad_(False)
        else:
            parts.vae = None
        # trained weights (and so grads and AdamW states) stay fp32, from their unrounded values
        start = {} if dtype == torch.float32 else snapshot(family.subset(parts.unet, args.finetuning_method))
        self.unet = unet = cast(parts.unet, device, dtype).requires_grad_(False)
        self.subset = subset = family.subset(unet, args.finetuning_method)
        for n, p in subset.items():
            p.data = start.pop(n).to(device) if n in start else p.data.float()
        msg = describe(subset, unet, args.finetuning_method)
        print(msg)
        self.logger.info(msg)
        if args.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        unet.train()
        optimizer, lr_scheduler, scaler = make_adamw(subset.values(), args, device, dtype)
        if args.optimizer_in_backward:
            step_in_backward(optimizer, subset.values())
        setup = Setup(family, unet, subset, args, self.concepts)
        self.method = method(setup)
        self.preserve = None  # --preserve_prompts: a term the loop adds to the method's loss (utils/train/preserve.py)
        if self.preserve_prompts and args.preserve_weight > 0:
            self.preserve = Preservation(family, self.preserve_prompts, self.embeds, setup.original(),
                                         args.preserve_weight, args.preserve_batch)
        self.schedule = concept_schedule(self.concepts, args.concept_method, args.num_train_steps, args.seed,
                                         args.concept_steps)
        generator = torch.Generator().manual_seed(args.seed)  # k, z_T and jitter: CPU draws, same on every device
        queue = TrajectoryQueue(args.num_ddim_steps, args.trajectory_samples, args.trajectory_reuse)
        self.state = TrainState(subset, self.method, optimizer, lr_scheduler, scaler, generator, queue)
        parts.scheduler.set_timesteps(args.num_ddim_steps, device=device)
        # --loss_space epsilon: each timestep's weight, checked and moved to the device once
        weights = family.epsilon_weights(parts.scheduler) if args.loss_space == "epsilon" else None
        self.loss_weights = None if weights is None else weights.to(device)

    def autocast(self):
        """Autocast to the frozen weights' dtype (off in fp32)."""
        return autocast_to(self.device, self.dtype)

    def _autotune(self) -> None:
        """--conv_autotune: time the CPU kernels now, at the batch sizes the steps use (2B, M*B, 2*M*B)."""
        args, c_0 = self.args, self.embeds[""]
        if not (args.conv_autotune and autotune_convolutions(self.unet, self.device)):
            return
        b, m = args.train_batch_size, args.trajectory_samples
        with torch.no_grad(), self.autocast():
            for n in sorted({2 * b, m * b, 2 * m * b}):
                self.family.predict(self.unet, None, torch.zeros(n, *self.latent_shape, device=self.device),
                                    self.parts.scheduler.timesteps[0], c_0.expand(n))
        self.logger.info("convolution kernels chosen per shape: %s", choices())

    def micro_step(self) -> tuple[torch.Tensor, str, int, torch.Tensor]:
        """Loss of one micro-step: z_t after k ~ U[0, N-1] guided DDIM steps of the sampler from z_T ~ N(0, I)."""
        args, st = self.args, self.state
        c_p = self.schedule[self.step]
        sample_prompt, removal_prompt = self.method.prompts(c_p)
        with self.autocast():  # (M distinct k with --trajectory_samples M; one trajectory per R micro-steps with R)
            item = st.queue.next(self.family, self.unet, self.method.sampler, self.parts.scheduler,
                                 (args.train_batch_size, *self.latent_shape), self.device, self.embeds, sample_prompt,
                                 self.embeds[""], args.guidance_scale, st.generator)
        t = self.family.jitter(item["t"], self.parts.scheduler, st.generator) if args.timestep_jitter else item["t"]
        weight = None if self.loss_weights is None else self.loss_weights[t.long()].reshape(-1, 1, 1, 1)
        batch = Batch(item["z"], t, item["k"], self.embeds[""], self.embeds[c_p], self.embeds[removal_prompt],
                      c_p, weight)
        with self.autocast():
            loss = self.method.loss(self.unet, batch)
            if self.preserve is not None:
                loss = loss + self.preserve.loss(self.unet, batch, self.step)
        if not torch.isfinite(loss):
            where = f"the last good checkpoint is {self.last_ckpt}" if self.last_ckpt else "no checkpoint was written yet"
            self.logger.error("loss is %s at step %d; stopping", loss.item(), self.step)
            raise UserError(f"loss became {loss.item()} at step {self.step} (concept {c_p!r}, k={item['k']}); "
                            f"stopped without saving; {where}")
        return loss, c_p, item["k"], t

    def train_step(self) -> tuple[float, str, int]:
        """One optimizer step over --gradient_accumulation_steps micro-steps; returns (loss, concept, k)."""
        args, st = self.args, self.state
        total = 0.0
        for _ in range(args.gradient_accumulation_steps):
            loss, c_p, k, t = self.micro_step()
            st.scaler.scale(loss / args.gradient_accumulation_steps).backward()
            total += loss.item() / args.gradient_accumulation_steps
        if not args.optimizer_in_backward:  # (with it, backward has already stepped each tensor)
            if args.max_grad_norm > 0:
                st.scaler.unscale_(st.optimizer)
                torch.nn.utils.clip_grad_norm_(self.subset.values(), args.max_grad_norm)
            st.scaler.step(st.optimizer)
            st.scaler.update()
            st.optimizer.zero_grad(set_to_none=True)
        st.lr_scheduler.step()
        self.method.after_step()
        self.step += 1
        self.logger.info("step %d loss %.6g concept %r k %d t %d lr %.3g%s", self.step, total, c_p, k, int(t.min()),
                         st.lr_scheduler.get_last_lr()[0],
                         "" if self.preserve is None else f" preserve {self.preserve.last:.6g}")
        return total, c_p, k

    def checkpoint_and_validate(self, stopping: bool) -> None:
        """Save a checkpoint every --checkpointing_steps and when stopping early; sample every --validation_steps."""
        args, step = self.args, self.step
        if step % args.checkpointing_steps == 0 or (stopping and step < args.num_train_steps):
            self.last_ckpt = save_checkpoint(self.out, step, self.state, self.identity, args.checkpoints_total_limit)
        if self.val_prompts and step % args.validation_steps == 0 and step < args.num_train_steps and not stopping:
            self.validate()

    def validate(self) -> None:
        """validation/step-N.png: each validation prompt sampled with the method's views."""
        path, a = self.out / "validation" / f"step-{self.step}.png", self.args
        validation_grid(self.family, self.unet, self.method.eval_views(), self.parts.scheduler, self.parts.vae, self.embeds,
                        self.val_prompts, self.latent_shape, self.device, self.autocast, path,
                        n=a.num_validation_images, seed=a.seed, scale=a.validation_guidance_scale)
        self.logger.info("validation grid %s", path)

    def finish(self) -> Path:
        """Final validation grid, then unet/ and erasure.safetensors; returns the output folder."""
        if self.val_prompts:
            self.validate()
        result, self.state = self.method.result, None  # drop the optimizer's states before the result is written
        save_result(self.family, self.unet, result, self.args, self.concepts, self.dtype, self.out)
        print(f"saved {self.out / 'unet'} and {self.out / 'erasure.safetensors'}")
        if self.args.export_lora_rank is not None:
            lora = export_lora(self.out / "erasure.safetensors", rank=self.args.export_lora_rank,
                               revision=self.args.revision, variant=self.args.variant, device=self.device, overwrite=True)
            print(describe_export(lora, self.out / "erasure.safetensors"))
        return self.out


def save_result(family: Family, unet: torch.nn.Module, result: View, args, concepts: list[str], dtype: torch.dtype,
                out: Path) -> None:
    """unet/ (a full diffusers U-Net folder) and erasure.safetensors (only the trained tensors, with metadata)."""
    meta = {"base_model": args.pretrained_model_name_or_path, "method": args.method,
            "finetuning_method": args.finetuning_method, "concepts": concepts, "num_train_steps": args.num_train_steps}
    save_erasure(out / "erasure.safetensors", result, meta)
    if dtype != torch.float32:
        # frozen weights were cast for training: write the result onto the untouched fp32 base instead
        unet = family.load_unet(args.pretrained_model_name_or_path, revision=args.revision, variant=args.variant)
        result = {n: t.to(unet.device, unet.dtype) for n, t in result.items()}
    with swapped_in(unet, result), atomic_dir(out / "unet") as tmp:
        unet.save_pretrained(tmp, safe_serialization=True)
