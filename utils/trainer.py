"""The training loop shared by SDD and ESD: data flow, optimizer, checkpoints, resume, signals, validation, saving.

A method (see train_sdd.py / train_esd.py) only says which weights sample z_t, what the loss is, what happens after
an optimizer step and which weights are the result. Everything else lives here once.
"""
from __future__ import annotations

import argparse
import json
import os
import logging
import re
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Protocol

import torch
from diffusers import UNet2DConditionModel
from diffusers.optimization import get_scheduler
from tqdm.auto import tqdm

from utils.cli import DTYPES, UserError, resolve_device, setup_logging
from utils.concepts import CONCEPT_METHODS, concept_schedule, joined
from utils.convtune import autotune_convolutions, choices
from utils.images import image_grid, save_png, to_pil
from utils.lora import describe_export, export_lora, rank_arg
from utils.models import SDParts, cast, from_pretrained, load_sd_parts
from utils.params import FINETUNING_METHODS, describe, trainable_parameters
from utils.sampling import TrajectoryQueue, ddim_sample, decode_latents, jitter_timestep
from utils.saving import atomic_dir, atomic_write_text, save_erasure
from utils.text import encode_once, read_word_list
from utils.views import View, snapshot, swapped_in

log = logging.getLogger("sdd")
LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")


# ----------------------------------------------------------------------------------------------- command line
def add_training_args(p: argparse.ArgumentParser, *, num_train_steps: int, weight_decay: float, max_grad_norm: float,
                      output_dir: str) -> None:
    """The flags both trainers share (names follow the reference code and the diffusers training examples)."""
    g = p.add_argument_group("model")
    g.add_argument("--pretrained_model_name_or_path", default="CompVis/stable-diffusion-v1-4",
                   help="hub id or local diffusers pipeline folder")
    g.add_argument("--revision", default=None, help="hub revision (branch, tag or commit)")
    g.add_argument("--variant", default=None, help="weight file variant, e.g. fp16")
    g = p.add_argument_group("concepts")
    g.add_argument("--removing_concepts", nargs="+", required=True,
                   help="concepts to remove: words/phrases, or one .txt file with one concept a line")
    g.add_argument("--concept_method", choices=CONCEPT_METHODS, default="iterative",
                   help="how c_p is chosen each step: cycle, random, the joined string, or one concept after another")
    g.add_argument("--guidance_scale", type=float, default=3.0, help="s_g: CFG scale used to sample z_t")
    g.add_argument("--num_ddim_steps", type=int, default=50, help="N: DDIM steps of the sampling trajectory")
    g.add_argument("--trajectory_samples", type=int, default=1,
                   help="M: train on M distinct steps of each sampled trajectory (amortises the teacher; opt-in, "
                        "changes the training distribution; see README 'Performance')")
    g.add_argument("--trajectory_reuse", type=int, default=1,
                   help="R: each teacher trajectory serves R micro-steps (M each; R * M <= N); cuts the teacher's "
                        "cost ~R-fold; opt-in, changes the training distribution; see README 'Performance'")
    g.add_argument("--timestep_jitter", action="store_true",
                   help="train at a DDPM timestep drawn inside t's DDIM bucket instead of t (reference code)")
    g = p.add_argument_group("optimization")
    g.add_argument("--finetuning_method", choices=list(FINETUNING_METHODS), default="xattn",
                   help="which U-Net parameters train (see utils/params.py)")
    g.add_argument("--num_train_steps", type=int, default=num_train_steps, help="optimizer steps")
    g.add_argument("--train_batch_size", type=int, default=1, help="z_T samples per micro-step")
    g.add_argument("--gradient_accumulation_steps", type=int, default=1, help="micro-steps per optimizer step")
    g.add_argument("--learning_rate", type=float, default=1e-5, help="AdamW learning rate")
    g.add_argument("--lr_scheduler", choices=LR_SCHEDULERS, default="constant", help="learning-rate schedule")
    g.add_argument("--lr_warmup_steps", type=int, default=0, help="warm-up steps of the schedule")
    g.add_argument("--adam_beta1", type=float, default=0.9, help="AdamW beta1")
    g.add_argument("--adam_beta2", type=float, default=0.999, help="AdamW beta2")
    g.add_argument("--adam_epsilon", type=float, default=1e-8, help="AdamW epsilon")
    g.add_argument("--weight_decay", type=float, default=weight_decay, help="AdamW weight decay")
    g.add_argument("--max_grad_norm", type=float, default=max_grad_norm, help="gradient-norm clip (0: off)")
    g.add_argument("--resolution", type=int, default=None, help="image size of z_T (default: the model's own)")
    g.add_argument("--seed", type=int, default=0, help="seed of k, z_T, the concept order and validation")
    g = p.add_argument_group("hardware")
    g.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    g.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], default="no",
                   help="dtype of the frozen weights (text encoder, VAE, frozen U-Net); trained weights stay fp32")
    g.add_argument("--gradient_checkpointing", action="store_true", help="recompute U-Net activations in backward")
    g.add_argument("--allow_tf32", action="store_true", help="allow TF32 matmuls on Ampere+ GPUs")
    g.add_argument("--conv_autotune", action="store_true",
                   help="time the convolution kernels once per shape and keep the fastest (cuDNN benchmark mode on a "
                        "GPU; oneDNN vs native im2col on the CPU, up to 1.8x faster U-Net forwards at 128 px); results "
                        "may then differ from an untuned run in the last bits")
    g = p.add_argument_group("outputs")
    g.add_argument("--output_dir", default=output_dir, help="where unet/, erasure.safetensors, logs and checkpoints go")
    g.add_argument("--overwrite_output_dir", action="store_true", help="allow writing into a folder with a finished run")
    g.add_argument("--export_lora_rank", type=rank_arg, default=None, help="at the end, also write OUTPUT_DIR/"
                   "erasure-lora-r{R}.safetensors: the erasure as a rank-R LoRA (or 'full'; docs/lora.md)")
    g.add_argument("--checkpointing_steps", type=int, default=500, help="save a resumable checkpoint every N steps")
    g.add_argument("--checkpoints_total_limit", type=int, default=None, help="keep only the newest N checkpoints")
    g.add_argument("--resume_from_checkpoint", default=None, help="a checkpoint folder, or 'latest' in output_dir")
    g.add_argument("--validation_prompts", nargs="+", default=None, help="prompts (or one .txt) to sample during training")
    g.add_argument("--validation_steps", type=int, default=250, help="sample the validation prompts every N steps")
    g.add_argument("--num_validation_images", type=int, default=2, help="images per validation prompt")
    g.add_argument("--validation_guidance_scale", type=float, default=7.5, help="CFG scale of validation images")


# ----------------------------------------------------------------------------------------------- methods
@dataclass
class Batch:
    """What a method sees each micro-step: z_t at DDIM step k, its timestep and the cached embeddings."""

    z: torch.Tensor
    t: torch.Tensor
    k: int
    c_0: torch.Tensor
    c_p: torch.Tensor
    c_s: torch.Tensor


class Method(Protocol):
    """The few lines in which SDD and ESD differ."""

    name: str
    sampler: View | None                 # weights that sample z_t (None: the live student)
    result: View                         # the weights saved at the end

    def loss(self, unet: torch.nn.Module, batch: Batch) -> torch.Tensor: ...
    def after_step(self) -> None: ...
    def eval_views(self) -> dict[str, View | None]: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: Mapping) -> None: ...


@dataclass
class Setup:
    """Everything a method needs to build itself."""

    unet: UNet2DConditionModel
    subset: dict[str, torch.nn.Parameter]
    args: argparse.Namespace
    concepts: list[str]


# ----------------------------------------------------------------------------------------------- checkpoints
def _checkpoints(output_dir: Path) -> list[Path]:
    found = [p for p in output_dir.glob("checkpoint-*") if re.fullmatch(r"checkpoint-\d+", p.name) and (p / "state.pt").exists()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def resolve_resume(args: argparse.Namespace) -> Path | None:
    """The checkpoint folder to resume from, None to start fresh; UserError for a path that does not exist."""
    if not args.resume_from_checkpoint:
        return None
    if args.resume_from_checkpoint == "latest":
        found = _checkpoints(Path(args.output_dir))
        return found[-1] if found else None
    path = Path(args.resume_from_checkpoint)
    if not (path / "state.pt").exists():
        raise UserError(f"checkpoint {path} does not exist (expected a checkpoint-N folder with state.pt)")
    return path


def check_output_dir(args: argparse.Namespace, resume: Path | None) -> None:
    """Refuse to overwrite a finished run or to ignore checkpoints silently."""
    out = Path(args.output_dir)
    if args.overwrite_output_dir or resume is not None:
        return
    if (out / "unet").exists() or (out / "erasure.safetensors").exists():
        raise UserError(f"{out} already holds a finished run; pick another --output_dir or pass --overwrite_output_dir")
    if _checkpoints(out) and args.resume_from_checkpoint != "latest":
        raise UserError(f"{out} holds checkpoints; pass --resume_from_checkpoint latest or --overwrite_output_dir")


def save_checkpoint(out: Path, step: int, subset, method: Method, optimizer, lr_scheduler, scaler,
                    generator: torch.Generator, queue: TrajectoryQueue, limit: int | None) -> Path:
    """checkpoint-N/state.pt with student and method weights, optimizer, scheduler, RNG states; written atomically."""
    final = out / f"checkpoint-{step}"
    state = {
        "step": step,
        "student": {n: p.detach().cpu() for n, p in subset.items()},
        "method": {n: v.detach().cpu() if torch.is_tensor(v) else v for n, v in method.state_dict().items()},
        "optimizer": optimizer.state_dict(),
        "lr_scheduler": lr_scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        "trajectories": queue.state_dict(),
        "rng": {"generator": generator.get_state(), "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
    }
    with atomic_dir(final) as tmp:
        torch.save(state, tmp / "state.pt")
    if limit:
        for old in _checkpoints(out)[:-limit]:
            shutil.rmtree(old, ignore_errors=True)
    log.info("saved %s", final)
    return final


def load_checkpoint(path: Path, subset, method: Method, optimizer, lr_scheduler, scaler, generator,
                    queue: TrajectoryQueue, device: torch.device) -> int:
    """Restore a checkpoint written by save_checkpoint; returns its step."""
    state = torch.load(path / "state.pt", map_location="cpu", weights_only=False)
    if state["student"].keys() != subset.keys():
        raise UserError(f"checkpoint {path} trains other parameters than --finetuning_method asks for")
    with torch.no_grad():
        for n, p in subset.items():
            p.copy_(state["student"][n])
    method.load_state_dict(state["method"])
    optimizer.load_state_dict(state["optimizer"])
    lr_scheduler.load_state_dict(state["lr_scheduler"])
    scaler.load_state_dict(state["scaler"])
    queue.load_state_dict(state.get("trajectories", {}), device)
    generator.set_state(state["rng"]["generator"])
    torch.set_rng_state(state["rng"]["torch"])
    if state["rng"]["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    return int(state["step"])


# ----------------------------------------------------------------------------------------------- validation
def validate(unet, parts: SDParts, views: dict[str, View | None], embeds: dict[str, torch.Tensor], prompts: list[str],
             args, latent_shape, device, autocast, path: Path) -> None:
    """Sample each validation prompt with each view (same seeds every time) and save one labelled grid."""
    rows, labels = [], []
    was_training = unet.training
    unet.eval()
    for view_name, view in views.items():
        for i, prompt in enumerate(prompts):
            gen = torch.Generator().manual_seed(args.seed + i)
            z = torch.randn((args.num_validation_images, *latent_shape), generator=gen).to(device)
            with autocast():
                z = ddim_sample(unet, view, parts.scheduler, z, embeds[prompt], embeds[""], args.validation_guidance_scale)
            rows.append(to_pil(decode_latents(parts.vae, z)))
            labels.append(f"{view_name}: {prompt}" if len(views) > 1 else prompt)
    unet.train(was_training)
    save_png(image_grid(rows, labels, label_width=160), path)
    log.info("validation grid %s", path)


# ----------------------------------------------------------------------------------------------- the loop
class _StopFlag:
    """Turns SIGINT/SIGTERM into 'save a checkpoint after this step and exit cleanly'."""

    def __init__(self) -> None:
        self.raised = False
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: no handler
                pass
        return self

    def _handle(self, signum, frame) -> None:
        if self.raised:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        self.raised = True
        tqdm.write(f"received signal {signum}: saving a checkpoint after this step")

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def train(args: argparse.Namespace, make_method: Callable[[Setup], Method]) -> Path:
    """Run one erasure: load, train `make_method`'s objective, save unet/ and erasure.safetensors; returns output_dir."""
    out = Path(args.output_dir)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UserError("training runs on one device; launch it without --num_processes > 1 (generate.py scales out)")
    concepts = read_word_list(args.removing_concepts, "concepts (--removing_concepts)")
    val_prompts = read_word_list(args.validation_prompts, "validation prompts") if args.validation_prompts else []
    if not 1 <= args.trajectory_samples <= args.num_ddim_steps:
        raise UserError(f"--trajectory_samples must be in [1, --num_ddim_steps], got {args.trajectory_samples}")
    if not 1 <= args.trajectory_samples * args.trajectory_reuse <= args.num_ddim_steps:
        raise UserError(f"--trajectory_samples x --trajectory_reuse must be in [1, --num_ddim_steps = "
                        f"{args.num_ddim_steps}], got {args.trajectory_samples} x {args.trajectory_reuse}")
    for flag in ("num_train_steps", "num_ddim_steps", "train_batch_size", "gradient_accumulation_steps",
                 "checkpointing_steps", "validation_steps", "num_validation_images"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    resume = resolve_resume(args)
    check_output_dir(args, resume)
    device = resolve_device(args.device)
    dtype = DTYPES[args.mixed_precision]
    if args.allow_tf32 and device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(args.seed)

    parts = load_sd_parts(args.pretrained_model_name_or_path, args.revision, args.variant)
    res = args.resolution or parts.default_resolution
    multiple = parts.vae_scale_factor * 2 ** (len(parts.unet.config.block_out_channels) - 1)
    if res % multiple:
        raise UserError(f"--resolution {res} is not divisible by {multiple} "
                        f"(VAE factor {parts.vae_scale_factor} x U-Net downsampling)")
    latent_shape = (parts.unet.config.in_channels, res // parts.vae_scale_factor, res // parts.vae_scale_factor)

    logger = setup_logging(out, "train.log")
    atomic_write_text(out / "args.json", json.dumps(vars(args), indent=2, default=str))
    logger.info("args %s", json.dumps(vars(args), default=str))

    # Text is encoded once (c_0 = "", c_p per concept, c_s = the joined string, validation prompts); then the
    # text encoder is freed. The VAE is kept only to decode validation images.
    cast(parts.text_encoder, device, dtype)
    embeds = encode_once(parts.tokenizer, parts.text_encoder, ["", joined(concepts), *concepts, *val_prompts], device)
    parts.text_encoder = None
    if val_prompts:
        parts.vae.encoder = None
        cast(parts.vae, device, dtype).requires_grad_(False)
    else:
        parts.vae = None

    # trained weights (and so grads and AdamW states) stay fp32, from their unrounded values
    start = {} if dtype == torch.float32 else snapshot(trainable_parameters(parts.unet, args.finetuning_method))
    unet = cast(parts.unet, device, dtype).requires_grad_(False)
    subset = trainable_parameters(unet, args.finetuning_method)
    for n, p in subset.items():
        p.data = start.pop(n).to(device) if n in start else p.data.float()
    msg = describe(subset, unet, args.finetuning_method)
    print(msg)
    logger.info(msg)
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()

    optimizer = torch.optim.AdamW(subset.values(), lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                                  eps=args.adam_epsilon, weight_decay=args.weight_decay)
    lr_scheduler = get_scheduler(args.lr_scheduler, optimizer, num_warmup_steps=args.lr_warmup_steps,
                                 num_training_steps=args.num_train_steps)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    method = make_method(Setup(unet, subset, args, concepts))
    schedule = concept_schedule(concepts, args.concept_method, args.num_train_steps, args.seed)
    generator = torch.Generator().manual_seed(args.seed)  # k, z_T and jitter: CPU draws, same on every device
    queue = TrajectoryQueue(args.num_ddim_steps, args.trajectory_samples, args.trajectory_reuse)
    parts.scheduler.set_timesteps(args.num_ddim_steps, device=device)
    autocast = lambda: torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)  # noqa: E731

    step = 0
    if resume is not None:
        step = load_checkpoint(resume, subset, method, optimizer, lr_scheduler, scaler, generator, queue, device)
        logger.info("resumed from %s at step %d", resume, step)
        print(f"resumed from {resume} at step {step}")
    elif args.resume_from_checkpoint == "latest":
        logger.info("no checkpoint in %s: starting a new run", out)

    c_0 = embeds[""]
    if args.conv_autotune and autotune_convolutions(unet, device):
        # time the CPU kernels now, at the batch sizes the steps use (teacher 2B, student M*B, ESD's pair 2*M*B)
        b = args.train_batch_size
        with torch.no_grad(), autocast():
            for n in sorted({2 * b, args.trajectory_samples * b, 2 * args.trajectory_samples * b}):
                unet(torch.zeros(n, *latent_shape, device=device), parts.scheduler.timesteps[0],
                     encoder_hidden_states=c_0.expand(n, -1, -1))
        logger.info("convolution kernels chosen per shape: %s", choices())
    last_ckpt = resume
    bar = tqdm(total=args.num_train_steps, initial=step, desc=method.name, dynamic_ncols=True)
    logger.info("training starts at step %d of %d", step, args.num_train_steps)  # benchmarks time from here
    t_start = time.time()
    with _StopFlag() as stop:
        while step < args.num_train_steps and not stop.raised:
            total = 0.0
            for _ in range(args.gradient_accumulation_steps):
                # z_t after k ~ U[0, N-1] guided DDIM steps of the sampler from z_T ~ N(0, I), conditioned on c_p
                # (M distinct k with --trajectory_samples M; one trajectory serves R micro-steps of its concept with
                # --trajectory_reuse R)
                with autocast():
                    item = queue.next(unet, method.sampler, parts.scheduler, (args.train_batch_size, *latent_shape),
                                      device, embeds, schedule[step], c_0, args.guidance_scale, generator)
                z, t, k, c_p = item["z"], item["t"], item["k"], schedule[step]
                # removal target c_s: every concept at once (paper), or the current one (reference code)
                c_s = joined(concepts) if getattr(args, "removal_target", "all") == "all" else c_p
                if args.timestep_jitter:
                    t = jitter_timestep(t, parts.scheduler, generator)
                with autocast():
                    loss = method.loss(unet, Batch(z, t, k, c_0, embeds[c_p], embeds[c_s]))
                if not torch.isfinite(loss):
                    where = f"the last good checkpoint is {last_ckpt}" if last_ckpt else "no checkpoint was written yet"
                    logger.error("loss is %s at step %d; stopping", loss.item(), step)
                    raise UserError(f"loss became {loss.item()} at step {step} (concept {c_p!r}, k={k}); "
                                    f"stopped without saving; {where}")
                scaler.scale(loss / args.gradient_accumulation_steps).backward()
                total += loss.item() / args.gradient_accumulation_steps
            if args.max_grad_norm > 0:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(subset.values(), args.max_grad_norm)
            scaler.step(optimizer)
            scaler.update()
            lr_scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            method.after_step()
            step += 1

            bar.update(1)
            bar.set_postfix(loss=f"{total:.4g}", concept=c_p[:20], k=k)
            logger.info("step %d loss %.6g concept %r k %d t %d lr %.3g", step, total, c_p, k, int(t.min()),
                        lr_scheduler.get_last_lr()[0])
            if step % args.checkpointing_steps == 0 or (stop.raised and step < args.num_train_steps):
                last_ckpt = save_checkpoint(out, step, subset, method, optimizer, lr_scheduler, scaler, generator,
                                            queue, args.checkpoints_total_limit)
            if val_prompts and step % args.validation_steps == 0 and step < args.num_train_steps:
                validate(unet, parts, method.eval_views(), embeds, val_prompts, args, latent_shape, device,
                         autocast, out / "validation" / f"step-{step}.png")
    bar.close()
    if step < args.num_train_steps:
        msg = (f"stopped at step {step}; checkpoint {last_ckpt}; "
               f"continue with --resume_from_checkpoint latest --output_dir {out}")
        logger.warning(msg)
        return out
    logger.info("trained %d steps in %.1f s", args.num_train_steps, time.time() - t_start)
    if val_prompts:
        validate(unet, parts, method.eval_views(), embeds, val_prompts, args, latent_shape, device, autocast,
                 out / "validation" / f"step-{step}.png")
    del optimizer, lr_scheduler
    save_result(unet, method.result, args, concepts, dtype, out)
    print(f"saved {out / 'unet'} and {out / 'erasure.safetensors'}")
    if args.export_lora_rank is not None:
        lora = export_lora(out / "erasure.safetensors", rank=args.export_lora_rank, revision=args.revision,
                           variant=args.variant, device=device, overwrite=True)
        print(describe_export(lora, out / "erasure.safetensors"))
    return out


def save_result(unet: UNet2DConditionModel, result: View, args, concepts: list[str], dtype: torch.dtype, out: Path) -> None:
    """unet/ (a full diffusers U-Net folder) and erasure.safetensors (only the trained tensors, with metadata)."""
    meta = {"base_model": args.pretrained_model_name_or_path, "method": args.method,
            "finetuning_method": args.finetuning_method, "concepts": concepts, "num_train_steps": args.num_train_steps}
    save_erasure(out / "erasure.safetensors", result, meta)
    if dtype != torch.float32:
        # frozen weights were cast for training: write the result onto the untouched fp32 base instead
        unet = from_pretrained(UNet2DConditionModel, args.pretrained_model_name_or_path, subfolder="unet",
                               revision=args.revision, variant=args.variant)
        result = {n: t.to(unet.device, unet.dtype) for n, t in result.items()}
    with swapped_in(unet, result), atomic_dir(out / "unet") as tmp:
        unet.save_pretrained(tmp, safe_serialization=True)
