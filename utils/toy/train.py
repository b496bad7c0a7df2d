"""Training the toy model on the CPU, seeded and resumable: a VAE, then the U-Net and text encoder(s) together (toy 3:
each text encoder first, alone and contrastively, then frozen; utils.toy.contrastive).

The pipeline is Stable-Diffusion-shaped (CLIP tokenizer + text encoder, AutoencoderKL 32x32 -> 4x16x16,
cross-attention UNet2DConditionModel, DDIM with SD's betas) and saved with save_pretrained, so every script loads it
like SD; with --family sdxl it is SDXL-shaped (two text encoders, pooled embedding and time ids; utils.toy.models)
and saved as a StableDiffusionXLPipeline, trained on the same data with either recipe. Each image's caption is
drawn afresh at every use (utils.toy.language.caption_distribution).
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from utils.cli import UserError, setup_logging
from utils.saving import atomic_write_text
from utils.toy.judge import judge
from utils.toy.language import CAPTION_MIX, COLOURS, SHAPES, caption_distribution, vocabulary
from utils.toy.models import ToyModules, build, build_sd, conditioner, make_pipeline
from utils.toy.render import make_dataset
from utils.train.checkpoints import (check_same_run, find_checkpoint, flag_identity, load_state, restore_rng,
                                     rng_state, run_steps, save_state)
from utils.train.views import ema_update, snapshot

MODEL_MAX_LENGTH = 16
LANGUAGE_FILE = "toy_language.json"  # a toy model's prompt grammar ({"articles": "an"}: toy 3); none: toy 2's
DEFAULT_GUIDANCE = 5.0
DEFAULT_STEPS = 20
# flags of `python -m utils.toy train` that do not change the model (a stopped run resumes under other values)
NEUTRAL_FLAGS = frozenset({"output_dir", "overwrite", "keep_checkpoints", "quiet", "threads", "checkpoint_every",
                           "command", "func"})


def build_models(tokenizer, seed: int = 0):
    """Fresh (untrained) text encoder, VAE and U-Net of the SD-shaped toy model, seeded (utils.toy.models.build_sd)."""
    m = build_sd(tokenizer, seed)
    return m.text_encoders["text_encoder"], m.vae, m.unet


def make_tokenizer(folder: str | os.PathLike):
    """The toy tokenizer: every word of the language is one token."""
    from utils.tokenizer import write_clip_tokenizer

    return write_clip_tokenizer(folder, vocabulary(), model_max_length=MODEL_MAX_LENGTH)


def make_scheduler(prediction_type: str = "epsilon", zero_snr: bool = False):
    """DDIM with Stable Diffusion's beta schedule; optionally rescaled to zero terminal SNR (Lin et al. 2024), which
    needs v-prediction and the first sampling step at t = T - 1 ("trailing" spacing)."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                         clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                         prediction_type=prediction_type, rescale_betas_zero_snr=zero_snr,
                         timestep_spacing="trailing" if zero_snr else "leading")


def _lr_at(step: int, total: int, warmup: int, final_frac: float = 0.1) -> float:
    """Linear warm-up, then cosine decay to `final_frac` of the peak."""
    if step < warmup:
        return (step + 1) / warmup
    p = (step - warmup) / max(1, total - warmup)
    return final_frac + (1 - final_frac) * 0.5 * (1 + math.cos(math.pi * min(1.0, p)))


def _to_unit(images: np.ndarray) -> torch.Tensor:
    """uint8 (n, H, W, 3) -> float (n, 3, H, W) in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def checkpoint_folder(ckpt_dir: Path, name: str, identity: dict) -> tuple[Path, Path | None]:
    """Where phase `name` keeps its checkpoint-N/ folders, and the newest one to resume (None: start the phase);
    UserError (one line) for a checkpoint of an older version or of a run with other flags."""
    folder, old = ckpt_dir / name, ckpt_dir / f"{name}.pt"
    if old.exists():
        raise UserError(f"{old} is a checkpoint of an older version of the toy trainer and cannot be resumed; delete "
                        f"{ckpt_dir} (or pass --overwrite) to train from the start")
    resume = find_checkpoint(folder, "latest")
    if resume is not None:
        check_same_run(resume, identity)
    return folder, resume


def _resumable_loop(name: str, modules: dict[str, torch.nn.Module], params: list, lr: float, weight_decay: float,
                    steps: int, seed: int, loss_fn: Callable[[torch.Generator], tuple[torch.Tensor, dict]],
                    args: argparse.Namespace, ckpt_dir: Path, log: logging.Logger, ema_decay: float = 0.0) -> None:
    """AdamW with warm-up + cosine, gradient clipping, a tqdm bar and checkpoints in ckpt_dir/{name}/checkpoint-N
    (the trainer's format; the newest is resumed, SIGINT/SIGTERM saves one and stops); with ema_decay > 0 the modules
    end with the exponential moving average of their weights (as SD's release)."""
    identity = flag_identity(args, NEUTRAL_FLAGS)
    folder, resume = checkpoint_folder(ckpt_dir, name, identity)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_at(s, steps, min(200, steps // 10 + 1)))
    gen = torch.Generator().manual_seed(seed)
    named = {f"{k}.{n}": p for k, m in modules.items() for n, p in m.named_parameters()}
    ema = snapshot(named) if ema_decay else {}
    start = 0
    if resume is not None:
        st = load_state(resume, kind=f"toy-{name}", what=f"the toy trainer's {name} phase")
        for k, m in modules.items():
            m.load_state_dict(st["modules"][k])
        opt.load_state_dict(st["opt"]), sched.load_state_dict(st["sched"]), restore_rng(st["rng"], gen)
        if ema:
            if "ema" not in st:
                raise UserError(f"{resume} was written without a weight average; resume it with --unet_ema_decay 0, "
                                "or delete it to start again")
            ema = st["ema"]
        start = st["step"]
        log.info("%s: resumed from %s at step %d", name, resume, start)
    for m in modules.values():
        m.train()
    bar = tqdm(desc=name, initial=start, total=steps, disable=args.quiet, dynamic_ncols=True)

    def train_step(step: int) -> None:
        loss, extra = loss_fn(gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if ema:
            ema_update(ema, named, min(ema_decay, (step + 1) / (step + 10)))  # the usual warm-up: short at first
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}", **{k: f"{v:.4f}" for k, v in extra.items()})
        if (step + 1) % 50 == 0 or step + 1 == steps:
            log.info("%s step %d/%d loss %.5f %s lr %.2e", name, step + 1, steps, loss.item(),
                     " ".join(f"{k} {v:.5f}" for k, v in extra.items()), sched.get_last_lr()[0])

    def save(step: int) -> Path:
        blob = {"kind": f"toy-{name}", "modules": {k: m.state_dict() for k, m in modules.items()},
                "opt": opt.state_dict(), "sched": sched.state_dict(), "rng": rng_state(gen)}
        return save_state(folder, step, blob | ({"ema": ema} if ema else {}), identity, limit=1)

    run_steps(start, steps, train_step, save, args.checkpoint_every, out=ckpt_dir.parent, resumed_latest=True,
              save_last=True, ended=lambda step: bar.close())
    with torch.no_grad():
        for n, e in ema.items():
            named[n].copy_(e)
    for m in modules.values():
        m.eval()


def copy_vae(vae, folder: str | os.PathLike, log: logging.Logger) -> None:
    """Load a trained toy VAE of the same shape (FOLDER/vae) instead of training one (the VAE phase depends only on
    the seed, the data and its flags, so a toy trained with them has it already)."""
    from diffusers import AutoencoderKL

    path = Path(folder) / "vae"
    if not (path / "config.json").is_file():
        raise UserError(f"--vae_from {folder}: no toy VAE in {path}")
    vae.load_state_dict(AutoencoderKL.from_pretrained(path).state_dict())
    log.info("vae copied from %s", path)


def train_vae(vae, images: np.ndarray, args: argparse.Namespace, ckpt_dir: Path, log: logging.Logger) -> None:
    """Train the VAE on the images: MSE + a small KL term (+ optionally latent channels 0-2 tied to pooled RGB)."""
    x_all = _to_unit(images)

    def loss_fn(gen: torch.Generator):
        x = x_all[torch.randint(len(x_all), (args.vae_batch_size,), generator=gen)]
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.mean + post.std * torch.randn(post.mean.shape, generator=gen)).sample
        mse = torch.nn.functional.mse_loss(rec, x)
        loss, extra = mse, {"mse": mse.item()}
        if args.vae_rgb_weight:
            # SD's latents are close to a linear map of the colours; tying the first three channels to the
            # block-averaged RGB keeps the colours' distances in the latent as they are in the pixels
            rgb = torch.nn.functional.avg_pool2d(x, x.shape[-1] // post.mean.shape[-1])
            tie = torch.nn.functional.mse_loss(post.mean[:, :3], rgb)
            loss, extra["rgb"] = loss + args.vae_rgb_weight * tie, tie.item()
        return loss + args.vae_kl_weight * post.kl().mean(), extra

    _resumable_loop("vae", {"vae": vae}, list(vae.parameters()), args.vae_lr, 0.0, args.vae_steps, args.seed + 1,
                    loss_fn, args, ckpt_dir, log)


@torch.no_grad()
def encode_moments(vae, images: np.ndarray, batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std of the VAE for every image (unscaled latents)."""
    means, stds = [], []
    x_all = _to_unit(images)
    for i in range(0, len(x_all), batch_size):
        post = vae.encode(x_all[i:i + batch_size]).latent_dist
        means.append(post.mean), stds.append(post.std)
    return torch.cat(means), torch.cat(stds)


def caption_list(an: bool = False) -> list[str]:
    """Every training caption, sorted: the rows of caption_table's ids."""
    return sorted({cap for c in COLOURS for s in SHAPES for cap, _ in caption_distribution(c, s, an)})


def caption_table(tokenizer, labels: list[tuple[str, str]], an: bool = False, empty: float = CAPTION_MIX["empty"]
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token ids of every training caption (caption_list), and per image a row of caption indices with their
    probabilities (the empty caption's share `empty`; an: toy 3's articles)."""
    pairs = [(c, s) for c in COLOURS for s in SHAPES]
    dists = [caption_distribution(c, s, an, empty) for c, s in pairs]
    captions = caption_list(an)
    ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    width = max(len(d) for d in dists)
    index = torch.zeros(len(pairs), width, dtype=torch.long)
    probs = torch.zeros(len(pairs), width)
    for i, d in enumerate(dists):
        for j, (cap, p) in enumerate(d):
            index[i, j], probs[i, j] = captions.index(cap), p
    rows = torch.tensor([pairs.index(lab) for lab in labels])
    return ids, index[rows], probs[rows]


def _rows(cond: dict, rows: torch.Tensor) -> dict:
    """The U-Net's conditioning keyword arguments (nested dicts of tensors) for the captions `rows` of `cond`'s."""
    return {k: _rows(v, rows) if isinstance(v, dict) else v[rows] for k, v in cond.items()}


def train_unet(m: ToyModules, tokenizer, means: torch.Tensor, stds: torch.Tensor, labels: list[tuple[str, str]],
               scaling_factor: float, args: argparse.Namespace, ckpt_dir: Path, log: logging.Logger) -> None:
    """Train the U-Net, and the text encoder(s) with it unless frozen (toy 3), with epsilon or v-prediction, each image
    under a freshly drawn caption."""
    scheduler = make_scheduler(args.prediction_type, args.zero_snr)
    ids, cap_index, cap_probs = caption_table(tokenizer, labels, args.articles == "an", args.caption_dropout)
    T = scheduler.config.num_train_timesteps
    condition = conditioner(m)
    if m.frozen_text:  # a frozen encoder gives every caption the same conditioning: encode each once
        with torch.no_grad():
            cached = condition(ids)
        condition = lambda rows: _rows(cached, rows)  # noqa: E731
        ids = torch.arange(len(ids))

    def loss_fn(gen: torch.Generator):
        b = args.unet_batch_size
        idx = torch.randint(len(means), (b,), generator=gen)
        lat = (means[idx] + stds[idx] * torch.randn(means[idx].shape, generator=gen)) * scaling_factor
        noise = torch.randn(lat.shape, generator=gen)
        t = torch.randint(0, T, (b,), generator=gen)
        pick = torch.multinomial(cap_probs[idx], 1, generator=gen).squeeze(1)
        pred = m.unet(scheduler.add_noise(lat, noise, t), t, **condition(ids[cap_index[idx, pick]])).sample
        target = noise if args.prediction_type == "epsilon" else scheduler.get_velocity(lat, noise, t)
        return torch.nn.functional.mse_loss(pred, target), {}

    modules = m.trained_with_unet()
    _resumable_loop("unet", modules, [p for mod in modules.values() for p in mod.parameters()], args.unet_lr, 1e-2,
                    args.unet_steps, args.seed + 2, loss_fn, args, ckpt_dir, log, args.unet_ema_decay)


def build_for(args: argparse.Namespace, tokenizer) -> ToyModules:
    """Fresh modules of args.family's shape at the recipe's text width and attention (seeded with args.seed)."""
    contrastive = args.text_encoder == "contrastive"
    kw = dict(text_width=args.text_width, attention=args.attention, frozen_text=contrastive)
    if args.family == "sdxl" and contrastive:  # text_encoder_2's projection is its contrastive one (as bigG's)
        kw["pooled"] = args.clip_dim
    return build(args.family, tokenizer, args.seed, **kw)


def train_text_encoders(m: ToyModules, images: np.ndarray, labels: list[tuple[str, str]], tokenizer,
                        args: argparse.Namespace, ckpt_dir: Path, log: logging.Logger, t0: float) -> None:
    """Each text encoder's contrastive phase, in pipeline order, each with its own heads and seeds; all leave frozen."""
    from utils.toy.contrastive import train_text_encoder

    hidden_layer = None if m.family == "sd" else -2  # what the U-Net reads: the last or the penultimate hidden state
    for i, (name, encoder) in enumerate(m.text_encoders.items()):  # seeds + 4, + 5 for the first, + 6, + 7 next
        train_text_encoder(encoder, images, labels, tokenizer, args, ckpt_dir, log, name, 2 * i, hidden_layer)
        log.info("%s trained (contrastive) and frozen after %.1fs", name.replace("_", " "), time.time() - t0)


def train(args: argparse.Namespace) -> Path:
    """Render the data set, train the text encoder(s) contrastively (toy 3), the VAE, then the U-Net (+ the text
    encoder(s), toy 2), save the pipeline (args.family's shape) to args.output_dir."""
    from utils.gen.pipelines import SAMPLING_DEFAULTS  # imported without transformers' notices

    out = Path(args.output_dir)
    if (out / "model_index.json").is_file() and not args.overwrite:
        raise UserError(f"{out} already holds a toy pipeline; pass --overwrite to replace it, or another --output_dir")
    ckpt_dir = out / "checkpoints"
    if args.overwrite:  # a new run: the old one's checkpoints would be resumed (or refused) otherwise
        shutil.rmtree(ckpt_dir, ignore_errors=True)
    for name in ("vae", "unet"):  # refused before anything is written
        checkpoint_folder(ckpt_dir, name, flag_identity(args, NEUTRAL_FLAGS))
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    log = setup_logging(out, "train_toy.log")
    log.info("train: %s", {k: v for k, v in vars(args).items() if k != "func"})
    t0 = time.time()
    torch.manual_seed(args.seed)
    images, labels = make_dataset(args.n_images, args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = make_tokenizer(tmp)
    m = build_for(args, tokenizer)
    vae = m.vae
    log.info("params: %s", ", ".join(f"{k} {sum(p.numel() for p in mod.parameters())}" for k, mod in
                                     [*m.text_encoders.items(), ("vae", vae), ("unet", m.unet)]))
    if args.text_encoder == "contrastive":
        train_text_encoders(m, images, labels, tokenizer, args, ckpt_dir, log, t0)
    if args.vae_from:
        copy_vae(vae, args.vae_from, log)
    else:
        train_vae(vae, images, args, ckpt_dir, log)
    log.info("vae trained after %.1fs", time.time() - t0)
    means, stds = encode_moments(vae, images)
    z = means + stds * torch.randn(means.shape, generator=torch.Generator().manual_seed(args.seed + 3))
    scaling_factor = float(1.0 / z.std())
    vae.register_to_config(scaling_factor=scaling_factor)
    with torch.no_grad():
        rec = vae.decode(means[:512]).sample.clamp(-1, 1)
    rec_u8 = ((rec + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    vae_ok = np.mean([judge(r) == judge(o) for r, o in zip(rec_u8, images[:512])])
    log.info("latent std %.4f -> scaling_factor %.4f; judge agrees on %.1f%% of VAE reconstructions",
             float(z.std()), scaling_factor, 100 * vae_ok)
    train_unet(m, tokenizer, means, stds, labels, scaling_factor, args, ckpt_dir, log)
    pipe = make_pipeline(m, tokenizer, make_scheduler(args.prediction_type, args.zero_snr))
    pipe.save_pretrained(out, safe_serialization=True)
    atomic_write_text(out / SAMPLING_DEFAULTS, json.dumps(  # what generate.py samples this model with by default
        {"num_inference_steps": DEFAULT_STEPS, "guidance_scale": DEFAULT_GUIDANCE}, indent=1) + "\n")
    if args.articles == "an":  # the measuring code reads the model's prompts' grammar here (none: toy 2's)
        atomic_write_text(out / LANGUAGE_FILE, json.dumps({"articles": "an"}, indent=1) + "\n")
    if not args.keep_checkpoints:
        shutil.rmtree(ckpt_dir, ignore_errors=True)
    log.info("saved pipeline to %s; total %.1fs", out, time.time() - t0)
    print(f"saved toy pipeline to {out} ({time.time() - t0:.0f}s)")
    return out
