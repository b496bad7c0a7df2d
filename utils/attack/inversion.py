"""Concept inversion: textual inversion on an erased model, learning new token embeddings that draw the concept again.

New tokens (a placeholder and, for N vectors, placeholder_1 ... placeholder_{N-1}, the names diffusers'
load_textual_inversion gives a multi-vector embedding) are added to the tokenizer(s), initialised from the concept
word's embedding and trained alone (every other weight frozen) with the denoising loss on the target images' VAE
latents: one (N, D) tensor per text encoder (SDXL: two), turned into a condition by the model family
(Family.caption_cond). The result is the family's textual-inversion file (Family.embedding_file).
"""
from __future__ import annotations

import logging
import os
import re
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file
from torch.func import functional_call
from tqdm.auto import tqdm

from utils.cli import UserError
from utils.eval.common import load_image_folder, load_rgb
from utils.families import Cond, Family, family_of_parts
from utils.loading import cast
from utils.saving import atomic_write
from utils.text import read_word_list
from utils.train.optim import autocast_to, make_adamw
from utils.train.checkpoints import (NEUTRAL_FLAGS, load_state, restore_rng, rng_state, run_identity, run_steps,
                                     save_state)

log = logging.getLogger("sdd")
# flags that only change how the attack is scored or how many images it draws, not the learned embedding
ATTACK_NEUTRAL_FLAGS = NEUTRAL_FLAGS | {"metric", "toy_colour", "nudity_classes", "nudity_threshold", "prompts",
                                        "num_images_per_prompt", "batch_size"}
SLOT = "{}"  # where the concept (or the learned token) goes in a template
EMBEDDING_FILE = "learned_embeds.safetensors"  # the name load_textual_inversion looks for in a folder
DEFAULT_TEMPLATES = ("{}", "a photo of {}", "a picture of {}", "an image of {}", "a close-up photo of {}",
                     "a rendering of {}")


# ------------------------------------------------------------------------------------------------------------ text
def fill(template: str, text: str) -> str:
    """The template with every {} replaced by `text`."""
    return template.replace(SLOT, text)


def read_templates(values: Sequence[str] | None, what: str) -> list[str]:
    """Templates from the command line or a .txt file; each must hold {} where the concept goes."""
    templates = read_word_list(values, what)
    bad = [t for t in templates if SLOT not in t]
    if bad:
        raise UserError(f"{what}: {bad[0]!r} has no {SLOT} marking where the concept goes")
    return templates


def default_placeholder(concept: str) -> str:
    """`<concept>` in lower case with runs of other characters turned into '-' ("a red" -> "<a-red>")."""
    return "<" + (re.sub(r"[^a-z0-9]+", "-", concept.lower()).strip("-") or "concept") + ">"


def placeholder_tokens(placeholder: str, num_vectors: int) -> list[str]:
    """The token names load_textual_inversion registers for an (N, D) embedding: p, p_1, ..., p_{N-1}."""
    return [placeholder] + [f"{placeholder}_{i}" for i in range(1, num_vectors)]


def concept_token_ids(tokenizer, concept: str, flag: str = "--concept") -> list[int]:
    """The concept's token ids (no start/end tokens); UserError when it has none, unknown ones, or too many."""
    ids = tokenizer(concept, add_special_tokens=False).input_ids
    if not ids:
        raise UserError(f"{flag} {concept!r} gives no tokens with this tokenizer; pass a word it can spell")
    if tokenizer.unk_token_id is not None and tokenizer.unk_token_id in ids and tokenizer.unk_token not in concept:
        raise UserError(f"{flag} {concept!r} holds characters this tokenizer does not know")
    room = tokenizer.model_max_length - 2
    if len(ids) > room:
        raise UserError(f"{flag} {concept!r} is {len(ids)} tokens; the tokenizer fits at most {room} in a prompt")
    return ids


def add_placeholder_tokens(tokenizer, tokens: Sequence[str]) -> list[int]:
    """Add the new tokens; UserError if one exists already or the tokenizer would split it."""
    vocab = tokenizer.get_vocab()
    clash = [t for t in tokens if t in vocab or len(tokenizer.tokenize(t)) == 1]  # a token, or a word it spells in one
    if clash:
        raise UserError(f"--placeholder_token {clash[0]!r} is already in the tokenizer's vocabulary (it would take "
                        f"over that word); choose another, e.g. <my-concept>")
    tokenizer.add_tokens(list(tokens))
    a = tokenizer.tokenize("a")
    split = [t for t in tokens if tokenizer.tokenize(f"a {t} a") != [*a, t, *a]]
    if split:
        raise UserError(f"--placeholder_token {split[0]!r} is not kept as one token by this tokenizer "
                        f"(use lower case and no spaces, e.g. <my-concept>)")
    return tokenizer.convert_tokens_to_ids(list(tokens))


# --------------------------------------------------------------------------------------------------------- targets
@dataclass
class Targets:
    """Target images as a (n, 3, H, W) tensor in [-1, 1] and each image's caption candidates."""

    pixels: torch.Tensor
    captions: list[list[str]]
    folder: str


def _square(image: Image.Image, size: int) -> torch.Tensor:
    """Resize the shorter side to `size`, centre-crop, -> (3, size, size) in [-1, 1]."""
    w, h = image.size
    s = size / min(w, h)
    image = image.resize((max(size, round(w * s)), max(size, round(h * s))), Image.Resampling.BICUBIC)
    left, top = (image.width - size) // 2, (image.height - size) // 2
    image = image.crop((left, top, left + size, top + size))
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float().div(127.5).sub(1.0)


def load_targets(folder: str | os.PathLike, resolution: int, concept: str, slot_text: str,
                 templates: Sequence[str]) -> Targets:
    """Read a folder of target images; a prompt naming the concept (metadata.csv) is its caption, else the templates."""
    images = load_image_folder(folder, "--target_dir")
    pixels = torch.stack([_square(load_rgb(p), resolution) for p in images.paths])
    word = re.compile(rf"(?<!\w){re.escape(concept)}(?!\w)", re.IGNORECASE)
    prompts = images.prompts or [""] * len(images)
    generic = [fill(t, slot_text) for t in templates]
    captions = [[word.sub(slot_text, p)] if word.search(p) else generic for p in prompts]
    return Targets(pixels, captions, str(images.root))


@torch.no_grad()
def encode_targets(vae, pixels: torch.Tensor, device: torch.device, dtype: torch.dtype,
                   batch_size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """The VAE posterior's mean and std of every target image (unscaled), computed once."""
    means, stds = [], []
    for i in range(0, len(pixels), batch_size):
        post = vae.encode(pixels[i:i + batch_size].to(device, dtype)).latent_dist
        means.append(post.mean.float())
        stds.append(post.std.float())
    return torch.cat(means), torch.cat(stds)


# -------------------------------------------------------------------------------------------------------- training
@dataclass
class LearnedRows:
    """One text encoder's new rows: the trained (N, D) tensor and what swaps it into the frozen encoder."""

    encoder: torch.nn.Module
    learned: torch.nn.Parameter          # (N, D): trained
    frozen: torch.Tensor                 # the encoder's (resized) embedding matrix
    weight_name: str                     # its parameter name, for functional_call
    new_ids: torch.Tensor

    def run(self, ids: torch.Tensor, **kwargs):
        """The encoder's output with the learned rows in place of the new tokens' embeddings."""
        weight = self.frozen.index_put((self.new_ids,), self.learned)
        return functional_call(self.encoder, {self.weight_name: weight}, (ids,), kwargs)


@dataclass
class Inversion:
    """The frozen model, the trained rows (one tensor per text encoder) and what a step needs."""

    family: Family
    parts: object                        # the family's parts (SDParts, SDXLParts)
    rows: list[LearnedRows]
    tokens: list[str]
    size: tuple[int, int] | None = None  # image size of the targets (for families with size conditioning)

    @property
    def learned(self) -> torch.nn.Parameter:
        """The first text encoder's rows (SD's only ones)."""
        return self.rows[0].learned

    @property
    def params(self) -> list[torch.nn.Parameter]:
        """Every trained tensor, one per text encoder."""
        return [r.learned for r in self.rows]

    @property
    def device(self) -> torch.device:
        """Where the text encoders and the learned rows are."""
        return self.rows[0].frozen.device

    def encode(self, captions: Sequence[str]) -> Cond:
        """The captions' condition with the learned rows in place of the new tokens' embeddings."""
        return self.family.caption_cond(self.parts, captions, self.device, self.size, [r.run for r in self.rows])


def _per_encoder(ids: Sequence) -> list[list[int]]:
    """One list of token ids per text encoder (a flat list: the only encoder's)."""
    return [list(ids)] if ids and isinstance(ids[0], int) else [list(i) for i in ids]


def _learned_rows(encoder, tokenizer, concept_ids: Sequence[int], n: int, new_ids: Sequence[int],
                  device: torch.device) -> LearnedRows:
    """Resize one encoder's embedding matrix, freeze it, start its new rows at the mean of the concept's embeddings."""
    encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    emb = encoder.get_input_embeddings()
    weight_name = next(name for name, m in encoder.named_modules() if m is emb) + ".weight"
    encoder.requires_grad_(False).eval().to(device)  # fp32: the learned rows and their gradient stay exact
    frozen = emb.weight.detach()
    start = frozen[list(concept_ids)].mean(0, keepdim=True).repeat(n, 1)
    return LearnedRows(encoder, torch.nn.Parameter(start.clone()), frozen, weight_name,
                       torch.tensor(list(new_ids), device=device))


def prepare(parts, concept_ids: Sequence, tokens: Sequence[str], new_ids: Sequence, device: torch.device,
            dtype: torch.dtype, gradient_checkpointing: bool = False, size: tuple[int, int] | None = None) -> Inversion:
    """Resize the embedding matrices, freeze everything, start the new rows at the mean of the concept's embeddings.
    concept_ids and new_ids: one list per text encoder (for a one-encoder family, a flat list will do)."""
    family = family_of_parts(parts)
    encoders, tokenizers = family.text_encoders(parts), family.tokenizers(parts)
    concept_ids, new_ids = _per_encoder(concept_ids), _per_encoder(new_ids)
    if not len(encoders) == len(concept_ids) == len(new_ids):
        raise ValueError(f"{len(encoders)} text encoders, but token ids for {len(concept_ids)} / {len(new_ids)}")
    rows = [_learned_rows(enc, tok, c, len(tokens), n, device)
            for enc, tok, c, n in zip(encoders, tokenizers, concept_ids, new_ids)]
    parts.unet = cast(parts.unet, device, dtype).requires_grad_(False).eval()
    parts.vae = cast(parts.vae, device, dtype).requires_grad_(False).eval()
    if gradient_checkpointing:  # diffusers recomputes whenever grad is enabled, in eval mode too
        parts.unet.enable_gradient_checkpointing()
    return Inversion(family, parts, rows, list(tokens), size)


def denoising_loss(inv: Inversion, latents: torch.Tensor, captions: Sequence[str], generator: torch.Generator,
                   autocast) -> torch.Tensor:
    """MSE between the U-Net's prediction and its target (epsilon, v or sample, per the scheduler) at random t."""
    sched = inv.parts.scheduler
    noise = torch.randn(latents.shape, generator=generator).to(latents.device)
    t = torch.randint(0, sched.config.num_train_timesteps, (len(latents),), generator=generator).to(latents.device)
    noisy, target = inv.family.noised(sched, latents, noise, t)
    unet = inv.parts.unet
    cond = inv.encode(captions).to(unet.device, unet.dtype)
    with autocast():
        pred = inv.family.predict(unet, None, noisy.to(unet.dtype), t, cond)
    return torch.nn.functional.mse_loss(pred.float(), target.float())


def save_embedding(path: str | os.PathLike, inv: Inversion, placeholder: str, metadata: dict[str, str]) -> None:
    """The learned rows as the family's textual-inversion file (SD: {placeholder: (N, D)}, the layout
    pipe.load_textual_inversion(path) reads; SDXL: clip_l and clip_g), safetensors, atomic."""
    tensors, extra = inv.family.embedding_file(placeholder, inv.tokens,
                                               [p.detach().float().cpu().contiguous() for p in inv.params])
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata={**metadata, **extra}))


def attack_identity(args) -> dict:
    """The flags that define the learned embedding (stored in each checkpoint's run.json, checked on resume)."""
    return run_identity(args, neutral=ATTACK_NEUTRAL_FLAGS)


def _save_checkpoint(out: Path, step: int, inv: Inversion, optimizer, lr_scheduler, scaler, generator,
                     args) -> Path:
    learned = [p.detach().cpu() for p in inv.params]
    blob = {"learned": learned[0] if len(learned) == 1 else learned, "tokens": inv.tokens,  # one: SD's layout
            "optimizer": optimizer.state_dict(), "lr_scheduler": lr_scheduler.state_dict(),
            "scaler": scaler.state_dict(), "rng": rng_state(generator)}
    return save_state(out, step, blob, attack_identity(args), args.checkpoints_total_limit)


def _load_checkpoint(path: Path, inv: Inversion, optimizer, lr_scheduler, scaler, generator) -> int:
    state = load_state(path, what="attack.py")
    learned = state.get("learned")
    learned = [learned] if isinstance(learned, torch.Tensor) else list(learned or [])
    if [t.shape for t in learned] != [p.shape for p in inv.params] or state["tokens"] != inv.tokens:
        raise UserError(f"checkpoint {path} is not an attack checkpoint with {len(inv.tokens)} vector(s) "
                        f"for {inv.tokens[0]}")
    with torch.no_grad():
        for p, t in zip(inv.params, learned):
            p.copy_(t)
    optimizer.load_state_dict(state["optimizer"])
    lr_scheduler.load_state_dict(state["lr_scheduler"])
    scaler.load_state_dict(state["scaler"])
    restore_rng(state["rng"], generator)
    return int(state["step"])


def train_embedding(inv: Inversion, targets: Targets, args, out: Path, resume: Path | None) -> int:
    """Train the new rows for args.num_train_steps (checkpoints, resume, Ctrl-C saves); return the step reached."""
    device, dtype = inv.device, inv.parts.unet.dtype
    mean, std = encode_targets(inv.parts.vae, targets.pixels, device, dtype)
    vae_cfg = inv.parts.vae.config
    shift, scale = getattr(vae_cfg, "shift_factor", None) or 0.0, vae_cfg.scaling_factor
    optimizer, lr_scheduler, scaler = make_adamw(inv.params, args, device, dtype)
    generator = torch.Generator().manual_seed(args.seed)
    autocast = partial(autocast_to, device, dtype)
    step = 0
    if resume is not None:
        step = _load_checkpoint(resume, inv, optimizer, lr_scheduler, scaler, generator)
        log.info("resumed from %s at step %d", resume, step)
        print(f"resumed from {resume} at step {step}")
    bar = tqdm(total=args.num_train_steps, initial=step, desc="attack", dynamic_ncols=True)
    t0 = time.time()

    def train_step(step: int) -> None:
        idx = torch.randint(len(mean), (args.train_batch_size,), generator=generator)
        z = mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=generator).to(device)
        captions = [targets.captions[i][int(torch.randint(len(targets.captions[i]), (1,), generator=generator))]
                    for i in idx.tolist()]
        loss = denoising_loss(inv, (z - shift) * scale, captions, generator, autocast)
        if not torch.isfinite(loss):
            raise UserError(f"loss became {loss.item()} at step {step}; lower --learning_rate")
        scaler.scale(loss).backward()
        if args.max_grad_norm > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(inv.params, args.max_grad_norm)
        scaler.step(optimizer)
        scaler.update()
        lr_scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4g}")
        log.info("step %d loss %.6g lr %.3g caption %r", step + 1, loss.item(), lr_scheduler.get_last_lr()[0],
                 captions[0])

    def ended(step: int) -> None:
        bar.close()
        log.info("trained to step %d in %.1f s", step, time.time() - t0)

    return run_steps(step, args.num_train_steps, train_step,
                     lambda s: _save_checkpoint(out, s, inv, optimizer, lr_scheduler, scaler, generator, args),
                     args.checkpointing_steps, out=out, resumed_latest=args.resume_from_checkpoint == "latest",
                     ended=ended)
