"""A toy world for concept-erasure experiments: coloured shapes on white, a small SD-shaped model and a judge.

Images are 32x32 RGB, white background, one filled shape (red/green/blue/yellow; circle/square/triangle) of random
size and position, captioned "a {colour} {shape}". `train` renders the data and trains, on the CPU and seeded, a
Stable-Diffusion-shaped pipeline (CLIP tokenizer + text encoder, AutoencoderKL 32x32 -> 4x16x16, cross-attention
UNet2DConditionModel, DDIM scheduler with SD's betas) saved with `save_pretrained` so every script loads it like SD.
`judge` tells colour and shape of an image from pixels alone (no learned model); `measure` and `compare` use it to
score a pipeline before and after erasure.

  python -m utils.toy train --output_dir assets/toy-sd          # ~45 min on 2 CPU cores
  python -m utils.toy evaluate                                   # the judge on freshly rendered images
  python -m utils.toy measure --model assets/toy-sd --output assets/toy_samples.png  # base-model numbers
  python -m utils.toy compare --base assets/toy-sd --unet OUT/unet --output OUT/before_after.png
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
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from utils.cli import HelpFormatter, UserError, resolve_device, run, setup_logging

os.environ.setdefault("HF_HUB_OFFLINE", "1")

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 60, 220),
    "yellow": (240, 200, 20),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
TOY_WORDS: tuple[str, ...] = ("a", *COLOURS, *SHAPES)
RESOLUTION = 32
BACKGROUND = (255, 255, 255)
MODEL_MAX_LENGTH = 16
DEFAULT_GUIDANCE = 5.0
DEFAULT_STEPS = 20
_SUPERSAMPLE = 4
_SIZE_RANGE = (10.0, 24.0)  # side of the shape's bounding box, in pixels
_SEED_STRIDE = 10_000  # seeds of prompt i are seed * 1e6 + i * _SEED_STRIDE + j


# ----------------------------------------------------------------------------------------------------------- data
def caption(colour: str, shape: str) -> str:
    """The caption of a colour/shape pair: "a {colour} {shape}"."""
    return f"a {colour} {shape}"


def all_prompts(colours: Sequence[str] | None = None, shapes: Sequence[str] | None = None) -> list[tuple[str, str]]:
    """Every (colour, shape) pair of the given subsets (default: all), colour-major."""
    return [(c, s) for c in (colours or COLOURS) for s in (shapes or SHAPES)]


def render(colour: str, shape: str, rng: np.random.Generator) -> Image.Image:
    """A 32x32 RGB image: one filled `shape` in `colour` on white, random size and position (antialiased)."""
    if colour not in COLOURS:
        raise ValueError(f"unknown colour {colour!r}; choose from {list(COLOURS)}")
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; choose from {list(SHAPES)}")
    k = _SUPERSAMPLE
    size = rng.uniform(*_SIZE_RANGE)
    x0, y0 = rng.uniform(1.0, RESOLUTION - 1.0 - size, size=2)
    x1, y1 = x0 + size, y0 + size
    big = Image.new("RGB", (RESOLUTION * k, RESOLUTION * k), BACKGROUND)
    draw = ImageDraw.Draw(big)
    fill = COLOURS[colour]
    box = (x0 * k, y0 * k, x1 * k - 1, y1 * k - 1)
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:  # upright triangle, base at the bottom, apex at the top centre
        draw.polygon([(x0 * k, y1 * k - 1), (x1 * k - 1, y1 * k - 1), ((x0 + x1) / 2 * k, y0 * k)], fill=fill)
    return big.resize((RESOLUTION, RESOLUTION), Image.Resampling.BOX)


def make_dataset(n: int, seed: int = 0) -> tuple[np.ndarray, list[str]]:
    """`n` rendered images as a uint8 array (n, 32, 32, 3) and their captions; colour and shape drawn uniformly."""
    rng = np.random.default_rng(seed)
    images = np.empty((n, RESOLUTION, RESOLUTION, 3), dtype=np.uint8)
    captions: list[str] = []
    colours, shapes = list(COLOURS), list(SHAPES)
    for i in range(n):
        c, s = colours[rng.integers(len(colours))], shapes[rng.integers(len(shapes))]
        images[i] = np.asarray(render(c, s, rng))
        captions.append(caption(c, s))
    return images, captions


def parse_caption(prompt: str) -> tuple[str | None, str | None]:
    """The (colour, shape) named in `prompt`, each None when absent (first match wins)."""
    words = [w.strip(".,;:!?\"'()") for w in prompt.lower().split()]
    colour = next((w for w in words if w in COLOURS), None)
    shape = next((w for w in words if w in SHAPES), None)
    return colour, shape


# ---------------------------------------------------------------------------------------------------------- judge
_FG_THRESHOLD = 96  # a pixel is foreground when some channel is this far below white
_MIN_PIXELS = 16  # fewer foreground pixels in the largest blob: no clear shape
_MAX_ASPECT = 1.6  # a bounding box more elongated than this is no clear shape
_FILL_SQUARE = 0.89  # fill ratio of the bounding box: square 1, circle pi/4, triangle 1/2; thresholds near midpoints
_FILL_CIRCLE = 0.655
_FILL_TRIANGLE = 0.36


def _components(mask: np.ndarray) -> list[np.ndarray]:
    """8-connected components of a boolean mask, one boolean mask each (flood fill; the images are tiny)."""
    seen = np.zeros_like(mask, dtype=bool)
    h, w = mask.shape
    out = []
    for y0, x0 in zip(*np.nonzero(mask)):
        if seen[y0, x0]:
            continue
        comp = np.zeros_like(mask, dtype=bool)
        stack = [(int(y0), int(x0))]
        seen[y0, x0] = True
        while stack:
            y, x = stack.pop()
            comp[y, x] = True
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    v, u = y + dy, x + dx
                    if 0 <= v < h and 0 <= u < w and mask[v, u] and not seen[v, u]:
                        seen[v, u] = True
                        stack.append((v, u))
        out.append(comp)
    return out


def judge_features(image: Image.Image | np.ndarray) -> dict | None:
    """Geometry of the largest foreground blob (pixels, bbox, fill ratio, aspect, mean colour), None if too small."""
    arr = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)
    if arr.ndim != 3 or arr.shape[-1] != 3:
        raise ValueError(f"judge expects an RGB image (H, W, 3), got shape {arr.shape}")
    if arr.dtype != np.uint8:  # floats in [0, 1]
        arr = (np.clip(arr, 0, 1) * 255).round().astype(np.uint8)
    dev = 255 - arr.astype(np.int16).min(axis=-1)
    mask = dev > _FG_THRESHOLD
    if mask.sum() < _MIN_PIXELS:
        return None
    blobs = _components(mask)
    blob, n = max(blobs, key=lambda m: int(m.sum())), len(blobs)
    pixels = int(blob.sum())
    if pixels < _MIN_PIXELS:
        return None
    rows, cols = np.nonzero(blob)
    h, w = int(rows.max() - rows.min() + 1), int(cols.max() - cols.min() + 1)
    return dict(pixels=pixels, height=h, width=w, fill=pixels / (h * w), aspect=max(h, w) / min(h, w),
                mean_rgb=arr[blob].astype(np.float64).mean(axis=0), blobs=n)


def judge(image: Image.Image | np.ndarray) -> tuple[str | None, str | None]:
    """(colour, shape) of the image's main shape from pixels alone; None for what is not clearly there."""
    f = judge_features(image)
    if f is None:
        return None, None
    palette = np.array(list(COLOURS.values()), dtype=np.float64)
    colour = list(COLOURS)[int(np.argmin(((palette - f["mean_rgb"]) ** 2).sum(axis=1)))]
    fill = f["fill"]
    if f["aspect"] > _MAX_ASPECT or fill < _FILL_TRIANGLE:
        shape = None
    elif fill >= _FILL_SQUARE:
        shape = "square"
    elif fill >= _FILL_CIRCLE:
        shape = "circle"
    else:
        shape = "triangle"
    return colour, shape


# ---------------------------------------------------------------------------------------------------------- model
def build_models(tokenizer, seed: int = 0):
    """Fresh (untrained) text encoder, VAE and U-Net of the toy model, seeded."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=tokenizer.model_max_length, projection_dim=64, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64),
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1, norm_num_groups=8, sample_size=RESOLUTION)
    unet = UNet2DConditionModel(
        sample_size=RESOLUTION // 2, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        # cross-attention (and self-attention) at the 8x8 level and in the mid block only: the 16x16 level's
        # attention doubled the CPU cost of a training step without being needed for colour and shape
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=64, attention_head_dim=4, norm_num_groups=8)
    return text_encoder, vae, unet


def make_scheduler():
    """DDIM with Stable Diffusion's beta schedule."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                         clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon")


def _lr_at(step: int, total: int, warmup: int, final_frac: float = 0.1) -> float:
    """Linear warm-up, then cosine decay to `final_frac` of the peak."""
    if step < warmup:
        return (step + 1) / warmup
    p = (step - warmup) / max(1, total - warmup)
    return final_frac + (1 - final_frac) * 0.5 * (1 + math.cos(math.pi * min(1.0, p)))


def _save_ckpt(path: Path, state: dict) -> None:
    """Write a checkpoint atomically (tmp file + rename)."""
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def _to_unit(images: np.ndarray) -> torch.Tensor:
    """uint8 (n, H, W, 3) -> float (n, 3, H, W) in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def train_vae(vae, images: np.ndarray, args: argparse.Namespace, ckpt_dir: Path, log: logging.Logger) -> None:
    """Train the VAE on the images (MSE + small KL), resuming from ckpt_dir/vae.pt when present."""
    from tqdm.auto import tqdm

    ckpt = ckpt_dir / "vae.pt"
    x_all = _to_unit(images)
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_at(s, args.vae_steps, min(100, args.vae_steps // 10 + 1)))
    gen = torch.Generator().manual_seed(args.seed + 1)
    start = 0
    if ckpt.exists():
        st = torch.load(ckpt, weights_only=False)
        vae.load_state_dict(st["model"]); opt.load_state_dict(st["opt"]); sched.load_state_dict(st["sched"])
        gen.set_state(st["gen"]); start = st["step"]
        log.info("vae: resumed from %s at step %d", ckpt, start)
    vae.train()
    bar = tqdm(range(start, args.vae_steps), desc="vae", initial=start, total=args.vae_steps, disable=args.quiet)
    for step in bar:
        idx = torch.randint(len(x_all), (args.vae_batch_size,), generator=gen)
        x = x_all[idx]
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen)
        rec = vae.decode(z).sample
        mse = torch.nn.functional.mse_loss(rec, x)
        kl = post.kl().mean()
        loss = mse + args.vae_kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step(); sched.step()
        bar.set_postfix(loss=f"{loss.item():.4f}", mse=f"{mse.item():.4f}")
        if (step + 1) % 50 == 0 or step + 1 == args.vae_steps:
            log.info("vae step %d/%d loss %.5f mse %.5f kl %.1f lr %.2e", step + 1, args.vae_steps, loss.item(),
                     mse.item(), kl.item(), sched.get_last_lr()[0])
        if (step + 1) % args.checkpoint_every == 0 or step + 1 == args.vae_steps:
            _save_ckpt(ckpt, dict(model=vae.state_dict(), opt=opt.state_dict(), sched=sched.state_dict(),
                                  gen=gen.get_state(), step=step + 1))
    vae.eval()


@torch.no_grad()
def encode_moments(vae, images: np.ndarray, batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std of the VAE for every image (unscaled latents)."""
    means, stds = [], []
    x_all = _to_unit(images)
    for i in range(0, len(x_all), batch_size):
        post = vae.encode(x_all[i:i + batch_size]).latent_dist
        means.append(post.mean); stds.append(post.std)
    return torch.cat(means), torch.cat(stds)


def train_unet(text_encoder, unet, tokenizer, means: torch.Tensor, stds: torch.Tensor, captions: list[str],
               scaling_factor: float, args: argparse.Namespace, ckpt_dir: Path, log: logging.Logger) -> None:
    """Train U-Net and text encoder together on epsilon prediction, dropping captions for classifier-free guidance."""
    from tqdm.auto import tqdm

    scheduler = make_scheduler()
    ckpt = ckpt_dir / "unet.pt"
    tok = lambda texts: tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length,
                                  truncation=True, return_tensors="pt").input_ids
    ids_all = tok(captions)
    ids_empty = tok([""])
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=args.unet_lr, weight_decay=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_at(s, args.unet_steps, min(200, args.unet_steps // 10 + 1)))
    gen = torch.Generator().manual_seed(args.seed + 2)
    start = 0
    if ckpt.exists():
        st = torch.load(ckpt, weights_only=False)
        unet.load_state_dict(st["unet"]); text_encoder.load_state_dict(st["text_encoder"])
        opt.load_state_dict(st["opt"]); sched.load_state_dict(st["sched"]); gen.set_state(st["gen"]); start = st["step"]
        log.info("unet: resumed from %s at step %d", ckpt, start)
    unet.train(); text_encoder.train()
    bar = tqdm(range(start, args.unet_steps), desc="unet", initial=start, total=args.unet_steps, disable=args.quiet)
    avg = None
    for step in bar:
        b = args.unet_batch_size
        idx = torch.randint(len(means), (b,), generator=gen)
        lat = (means[idx] + stds[idx] * torch.randn(means[idx].shape, generator=gen)) * scaling_factor
        noise = torch.randn(lat.shape, generator=gen)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (b,), generator=gen)
        drop = torch.rand(b, generator=gen) < args.caption_dropout
        ids = torch.where(drop[:, None], ids_empty.expand(b, -1), ids_all[idx])
        enc = text_encoder(ids)[0]
        pred = unet(scheduler.add_noise(lat, noise, t), t, enc).sample
        loss = torch.nn.functional.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step(); sched.step()
        avg = loss.item() if avg is None else 0.98 * avg + 0.02 * loss.item()
        bar.set_postfix(loss=f"{loss.item():.4f}", avg=f"{avg:.4f}")
        if (step + 1) % 50 == 0 or step + 1 == args.unet_steps:
            log.info("unet step %d/%d loss %.5f avg %.5f lr %.2e", step + 1, args.unet_steps, loss.item(), avg,
                     sched.get_last_lr()[0])
        if (step + 1) % args.checkpoint_every == 0 or step + 1 == args.unet_steps:
            _save_ckpt(ckpt, dict(unet=unet.state_dict(), text_encoder=text_encoder.state_dict(), opt=opt.state_dict(),
                                  sched=sched.state_dict(), gen=gen.get_state(), step=step + 1))
    unet.eval(); text_encoder.eval()


def train(args: argparse.Namespace) -> Path:
    """Render the data set, train VAE then U-Net + text encoder, save the pipeline to args.output_dir."""
    from diffusers import StableDiffusionPipeline

    from utils.tokenizer import write_clip_tokenizer

    out = Path(args.output_dir)
    ckpt_dir = out / "checkpoints"
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    log = setup_logging(out, "train_toy.log")
    log.info("train: %s", {k: v for k, v in vars(args).items() if k != "func"})
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.time()
    torch.manual_seed(args.seed)
    images, captions = make_dataset(args.n_images, args.seed)
    log.info("rendered %d images in %.1fs", len(images), time.time() - t0)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = write_clip_tokenizer(tmp, TOY_WORDS, model_max_length=MODEL_MAX_LENGTH)
    text_encoder, vae, unet = build_models(tokenizer, args.seed)
    log.info("params: text_encoder %d, vae %d, unet %d", *(sum(p.numel() for p in m.parameters())
                                                          for m in (text_encoder, vae, unet)))
    t1 = time.time()
    train_vae(vae, images, args, ckpt_dir, log)
    log.info("vae trained in %.1fs", time.time() - t1)
    means, stds = encode_moments(vae, images)
    gen = torch.Generator().manual_seed(args.seed + 3)
    z = means + stds * torch.randn(means.shape, generator=gen)
    scaling_factor = float(1.0 / z.std())
    vae.register_to_config(scaling_factor=scaling_factor)
    with torch.no_grad():
        rec = vae.decode(means[:512]).sample.clamp(-1, 1)
    rec_u8 = ((rec + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    vae_ok = np.mean([judge(r) == judge(o) for r, o in zip(rec_u8, images[:512])])
    log.info("latent std %.4f -> scaling_factor %.4f; judge agrees on %.1f%% of VAE reconstructions",
             float(z.std()), scaling_factor, 100 * vae_ok)
    t2 = time.time()
    train_unet(text_encoder, unet, tokenizer, means, stds, captions, scaling_factor, args, ckpt_dir, log)
    log.info("unet + text encoder trained in %.1fs", time.time() - t2)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=make_scheduler(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(out, safe_serialization=True)
    if not args.keep_checkpoints:
        shutil.rmtree(ckpt_dir, ignore_errors=True)
    log.info("saved pipeline to %s; total %.1fs", out, time.time() - t0)
    print(f"saved toy pipeline to {out} ({time.time() - t0:.0f}s)")
    return out


# ------------------------------------------------------------------------------------------------------- sampling
def load_pipeline(model: str | os.PathLike, unet: str | os.PathLike | None = None, device: str | None = "cpu"):
    """A StableDiffusionPipeline from a local folder, optionally with its U-Net replaced by an erased one."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    from utils.models import check_model_source, from_pretrained

    check_model_source(str(model))
    pipe = from_pretrained(StableDiffusionPipeline, str(model), safety_checker=None, requires_safety_checker=False,
                           dtype=torch.float32)
    if unet is not None:
        path = Path(unet)
        if not path.exists():
            raise UserError(f"U-Net folder {unet} does not exist")
        if (path / "unet").is_dir() and not (path / "config.json").exists():
            path = path / "unet"
        pipe.unet = from_pretrained(UNet2DConditionModel, str(path), dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(resolve_device(device))


@torch.no_grad()
def sample_images(pipe, prompts: Sequence[str], seeds: Sequence[int], num_inference_steps: int = DEFAULT_STEPS,
                  guidance_scale: float = DEFAULT_GUIDANCE, batch_size: int = 64) -> list[Image.Image]:
    """One image per (prompt, seed); each image's initial latents come from a CPU generator seeded by its seed."""
    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    unet = pipe.unet
    size = unet.config.sample_size
    shape = (unet.config.in_channels, size, size)
    vsf = pipe.vae_scale_factor
    out: list[Image.Image] = []
    for i in range(0, len(prompts), batch_size):
        ps, ss = list(prompts[i:i + batch_size]), seeds[i:i + batch_size]
        latents = torch.stack([torch.randn(shape, generator=torch.Generator("cpu").manual_seed(int(s))) for s in ss])
        res = pipe(prompt=ps, latents=latents.to(pipe.device, unet.dtype), num_inference_steps=num_inference_steps,
                   guidance_scale=guidance_scale, height=size * vsf, width=size * vsf, output_type="pil")
        out.extend(res.images)
    return out


def prompt_seeds(colour: str, shape: str, n: int, seed: int = 0) -> list[int]:
    """The seeds `measure` uses for a prompt: fixed per (seed, colour, shape), whatever subset is measured."""
    if n > _SEED_STRIDE:
        raise ValueError(f"at most {_SEED_STRIDE} images per prompt")
    i = all_prompts().index((colour, shape))
    return [seed * 1_000_000 + i * _SEED_STRIDE + j for j in range(n)]


def _check_subset(values: Sequence[str] | None, allowed: Sequence[str], what: str) -> list[str]:
    values = list(values) if values else list(allowed)
    bad = [v for v in values if v not in allowed]
    if bad:
        raise UserError(f"unknown {what} {bad}; choose from {list(allowed)}")
    return values


def measure(pipe, n_per_prompt: int = 20, seed: int = 0, colours: Sequence[str] | None = None,
            shapes: Sequence[str] | None = None, num_inference_steps: int = DEFAULT_STEPS,
            guidance_scale: float = DEFAULT_GUIDANCE, batch_size: int = 64) -> dict:
    """Generate "a {colour} {shape}" n_per_prompt times for every pair and judge the images.

    Returns colour_rate[c] (share of images asked for colour c that show c), shape_acc (overall),
    shape_acc_by_colour[c], shape_acc_by_shape[s], colour_counts[c][judged] (judged colour, "none" when unclear),
    none_rate, settings, and images[prompt] (PIL images in seed order) with judged[prompt] ((colour, shape) per image).
    """
    colours = _check_subset(colours, list(COLOURS), "colours")
    shapes = _check_subset(shapes, list(SHAPES), "shapes")
    pairs = all_prompts(colours, shapes)
    prompts, seeds = [], []
    for c, s in pairs:
        prompts += [caption(c, s)] * n_per_prompt
        seeds += prompt_seeds(c, s, n_per_prompt, seed)
    imgs = sample_images(pipe, prompts, seeds, num_inference_steps, guidance_scale, batch_size)
    verdicts = [judge(im) for im in imgs]
    res: dict = dict(settings=dict(n_per_prompt=n_per_prompt, seed=seed, num_inference_steps=num_inference_steps,
                                   guidance_scale=guidance_scale, colours=colours, shapes=shapes),
                     colour_rate={}, shape_acc_by_colour={}, shape_acc_by_shape={}, colour_counts={},
                     images={}, judged={})
    for k, (c, s) in enumerate(pairs):
        p = caption(c, s)
        res["images"][p] = imgs[k * n_per_prompt:(k + 1) * n_per_prompt]
        res["judged"][p] = verdicts[k * n_per_prompt:(k + 1) * n_per_prompt]
    asked = [(c, s) for c, s in pairs for _ in range(n_per_prompt)]
    for c in colours:
        v = [(jc, js, s) for (ac, s), (jc, js) in zip(asked, verdicts) if ac == c]
        res["colour_rate"][c] = float(np.mean([jc == c for jc, _, _ in v]))
        res["shape_acc_by_colour"][c] = float(np.mean([js == s for _, js, s in v]))
        counts = {k: 0 for k in [*COLOURS, "none"]}
        for jc, _, _ in v:
            counts[jc or "none"] += 1
        res["colour_counts"][c] = counts
    for s in shapes:
        res["shape_acc_by_shape"][s] = float(np.mean([js == s for (_, as_), (_, js) in zip(asked, verdicts) if as_ == s]))
    res["shape_acc"] = float(np.mean([js == s for (_, s), (_, js) in zip(asked, verdicts)]))
    res["colour_acc"] = float(np.mean([jc == c for (c, _), (jc, _) in zip(asked, verdicts)]))
    res["none_rate"] = float(np.mean([jc is None for jc, _ in verdicts]))
    return res


def numbers(res: dict) -> dict:
    """`measure`'s result without the images (JSON-serialisable)."""
    out = {k: v for k, v in res.items() if k != "images"}
    out["judged"] = {p: [list(v) for v in vs] for p, vs in res["judged"].items()}
    return out


def format_table(before: dict, after: dict | None = None) -> str:
    """Rows: colours; columns: colour rate and shape accuracy (before/after when `after` is given)."""
    head = f"{'colour':<8} {'colour%':>8} {'shape%':>8}" if after is None else \
        f"{'colour':<8} {'colour% before':>15} {'after':>7} {'shape% before':>14} {'after':>7}"
    lines = [head, "-" * len(head)]
    for c in before["colour_rate"]:
        if after is None:
            lines.append(f"{c:<8} {100 * before['colour_rate'][c]:>8.1f} {100 * before['shape_acc_by_colour'][c]:>8.1f}")
        else:
            lines.append(f"{c:<8} {100 * before['colour_rate'][c]:>15.1f} {100 * after['colour_rate'][c]:>7.1f} "
                         f"{100 * before['shape_acc_by_colour'][c]:>14.1f} {100 * after['shape_acc_by_colour'][c]:>7.1f}")
    if after is None:
        lines.append(f"{'all':<8} {100 * before['colour_acc']:>8.1f} {100 * before['shape_acc']:>8.1f}")
    else:
        lines.append(f"{'all':<8} {100 * before['colour_acc']:>15.1f} {100 * after['colour_acc']:>7.1f} "
                     f"{100 * before['shape_acc']:>14.1f} {100 * after['shape_acc']:>7.1f}")
    return "\n".join(lines)


def image_grid(panels: Sequence[tuple[str, dict[str, list[Image.Image]]]], show: int = 6, scale: int = 2) -> Image.Image:
    """Rows labelled by prompt; one block of `show` images per panel (e.g. before | after), titled on top."""
    font = ImageFont.load_default()
    prompts = list(panels[0][1])
    show = max(1, min(show, max(len(v) for _, imgs in panels for v in imgs.values())))
    cell, gap, label_w, title_h = RESOLUTION * scale, 2, 96, 14
    block_w = show * (cell + gap)
    width = label_w + len(panels) * (block_w + 12)
    height = title_h + len(prompts) * (cell + gap)
    grid = Image.new("RGB", (width, height), (235, 235, 235))
    draw = ImageDraw.Draw(grid)
    for b, (title, imgs) in enumerate(panels):
        x0 = label_w + b * (block_w + 12)
        draw.text((x0, 1), title, fill=(0, 0, 0), font=font)
        if b:
            draw.line([(x0 - 7, 0), (x0 - 7, height)], fill=(120, 120, 120), width=2)
        for r, p in enumerate(prompts):
            for j, im in enumerate(imgs[p][:show]):
                grid.paste(im.resize((cell, cell), Image.Resampling.NEAREST), (x0 + j * (cell + gap), title_h + r * (cell + gap)))
    for r, p in enumerate(prompts):
        draw.text((2, title_h + r * (cell + gap) + cell // 2 - 6), p, fill=(0, 0, 0), font=font)
    return grid


# ------------------------------------------------------------------------------------------------------------ CLI
def main_train(args: argparse.Namespace) -> None:
    """`train`: render data and train the toy pipeline."""
    if args.n_images < 1 or args.vae_steps < 1 or args.unet_steps < 1:
        raise UserError("--n_images, --vae_steps and --unet_steps must be positive")
    train(args)


def main_evaluate(args: argparse.Namespace) -> None:
    """`evaluate`: the judge's accuracy on freshly rendered images."""
    images, captions = make_dataset(args.n, args.seed)
    ok_c = ok_s = 0
    per: dict[str, list[int]] = {}
    for im, cap in zip(images, captions):
        c, s = parse_caption(cap)
        jc, js = judge(im)
        ok_c += jc == c
        ok_s += js == s
        per.setdefault(s, [0, 0])
        per[s][0] += js == s
        per[s][1] += 1
    print(f"judge on {args.n} rendered images (seed {args.seed}): colour {100 * ok_c / args.n:.2f}%, "
          f"shape {100 * ok_s / args.n:.2f}%")
    for s, (k, n) in per.items():
        print(f"  {s:<9} {100 * k / n:.2f}% of {n}")


def main_measure(args: argparse.Namespace) -> None:
    """`measure`: generate every prompt with a model and print how often the judge sees what was asked."""
    pipe = load_pipeline(args.model, args.unet, args.device)
    t0 = time.time()
    res = measure(pipe, args.n_per_prompt, args.seed, args.colours, args.shapes, args.steps, args.guidance_scale,
                  args.batch_size)
    print(f"{args.model}{' + ' + args.unet if args.unet else ''}: {args.n_per_prompt}/prompt, seed {args.seed}, "
          f"{args.steps} DDIM steps, guidance {args.guidance_scale} ({time.time() - t0:.0f}s)")
    print(format_table(res))
    print("shape accuracy by shape: " + ", ".join(f"{s} {100 * v:.1f}%" for s, v in res["shape_acc_by_shape"].items()))
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        title = f"{args.model}{' + ' + args.unet if args.unet else ''}: {args.steps} DDIM steps, guidance {args.guidance_scale}"
        image_grid([(title, res["images"])], show=args.show).save(args.output)
        print(f"wrote {args.output}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(dict(model=str(args.model), unet=args.unet, **numbers(res)), indent=1))
        print(f"wrote {args.json}")


def main_compare(args: argparse.Namespace) -> None:
    """`compare`: base model vs the same pipeline with an erased U-Net; table, PNG grid and JSON."""
    pipe = load_pipeline(args.base, None, args.device)
    kw = dict(n_per_prompt=args.n_per_prompt, seed=args.seed, colours=args.colours, shapes=args.shapes,
              num_inference_steps=args.steps, guidance_scale=args.guidance_scale, batch_size=args.batch_size)
    before = measure(pipe, **kw)
    pipe.unet = load_pipeline(args.base, args.unet, args.device).unet
    after = measure(pipe, **kw)
    print(f"before: {args.base}   after: {args.unet}   ({args.n_per_prompt}/prompt, seed {args.seed}, "
          f"{args.steps} DDIM steps, guidance {args.guidance_scale})")
    print(format_table(before, after))
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    image_grid([("before", before["images"]), ("after", after["images"])], show=args.show).save(out)
    js = dict(base=str(args.base), unet=str(args.unet), before=numbers(before), after=numbers(after))
    out.with_suffix(".json").write_text(json.dumps(js, indent=1))
    print(f"wrote {out} and {out.with_suffix('.json')}")


def _add_sampling_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--n_per_prompt", type=int, default=20, help="images generated per prompt")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial latents (seeds differ per prompt)")
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="DDIM inference steps")
    p.add_argument("--guidance_scale", type=float, default=DEFAULT_GUIDANCE, help="classifier-free guidance scale")
    p.add_argument("--batch_size", type=int, default=64, help="images per pipeline call")
    p.add_argument("--colours", nargs="+", choices=list(COLOURS), default=None, help="colours to prompt (None: all)")
    p.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=None, help="shapes to prompt (None: all)")
    p.add_argument("--show", type=int, default=6, help="images per prompt shown in the PNG grid")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse `python -m utils.toy {train,evaluate,measure,compare} ...`."""
    parser = argparse.ArgumentParser(prog="python -m utils.toy", description=__doc__, formatter_class=HelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="render the data and train the toy pipeline (CPU, seeded)", formatter_class=HelpFormatter)
    p.add_argument("--output_dir", default="assets/toy-sd", help="where the pipeline, train_toy.log and checkpoints go")
    p.add_argument("--seed", type=int, default=0, help="seed of the data, the initial weights and training")
    p.add_argument("--n_images", type=int, default=6000, help="rendered training images")
    p.add_argument("--vae_steps", type=int, default=800, help="VAE training steps")
    p.add_argument("--vae_batch_size", type=int, default=32, help="VAE batch size")
    p.add_argument("--vae_lr", type=float, default=1e-3, help="VAE peak learning rate (AdamW, warm-up + cosine)")
    p.add_argument("--vae_kl_weight", type=float, default=1e-6, help="weight of the VAE's KL term")
    p.add_argument("--unet_steps", type=int, default=3000, help="U-Net + text encoder training steps")
    p.add_argument("--unet_batch_size", type=int, default=64, help="U-Net batch size")
    p.add_argument("--unet_lr", type=float, default=1e-3, help="U-Net + text encoder peak learning rate")
    p.add_argument("--caption_dropout", type=float, default=0.1, help="share of captions replaced by '' (for CFG)")
    p.add_argument("--checkpoint_every", type=int, default=250, help="steps between checkpoints (resumed automatically)")
    p.add_argument("--keep_checkpoints", action="store_true", help="keep OUTPUT_DIR/checkpoints after success")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (0: torch's default); results are reproducible for a fixed value")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=main_train)

    p = sub.add_parser("evaluate", help="accuracy of the judge on freshly rendered images", formatter_class=HelpFormatter)
    p.add_argument("--n", type=int, default=2400, help="rendered images")
    p.add_argument("--seed", type=int, default=12345, help="seed of the rendering")
    p.set_defaults(func=main_evaluate)

    p = sub.add_parser("measure", help="generate every prompt with a model and judge it", formatter_class=HelpFormatter)
    p.add_argument("--model", default="assets/toy-sd", help="pipeline folder")
    p.add_argument("--unet", default=None, help="optional U-Net folder replacing the pipeline's (e.g. OUT/unet)")
    p.add_argument("--output", default=None, help="optional PNG grid of samples, rows labelled by prompt")
    p.add_argument("--json", default=None, help="optional JSON file for the numbers")
    _add_sampling_flags(p)
    p.set_defaults(func=main_measure)

    p = sub.add_parser("compare", help="base model vs an erased U-Net: table, PNG grid and JSON", formatter_class=HelpFormatter)
    p.add_argument("--base", default="assets/toy-sd", help="base pipeline folder")
    p.add_argument("--unet", required=True, help="erased U-Net folder (OUT/unet, or OUT holding unet/)")
    p.add_argument("--output", required=True, help="PNG grid, before on the left, after on the right; JSON beside it")
    _add_sampling_flags(p)
    p.set_defaults(func=main_compare)

    args = parser.parse_args(argv)
    for name in ("n_per_prompt", "steps", "batch_size", "n"):
        if getattr(args, name, 1) is not None and getattr(args, name, 1) < 1:
            parser.error(f"--{name} must be positive")
    return args


def main(args: argparse.Namespace) -> None:
    """Run the chosen subcommand."""
    args.func(args)


if __name__ == "__main__":
    run(main, parse_args)
