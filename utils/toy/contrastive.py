"""Toy 3's text encoder, learned first and alone as CLIP's was: contrastively against a small image encoder (the SDXL
toy: each of its two encoders in a phase of its own, as SDXL's are two separately trained CLIP models).

The image encoder reads the 32x32 RGB images (pixels, as CLIP's image tower does; this also makes the phase
independent of the VAE). Both towers end in a linear projection to a shared space; the loss is CLIP's symmetric
InfoNCE with a learned temperature (logit_scale, initialised to ln(1 / 0.07) and capped at 100). Captions come from
the U-Net phase's caption distribution (synonyms, bare colours, shapes alone and objects) without the empty caption,
which matches every image. Many captions in a batch agree with several of its images ("red" fits every red image, two
images may share colour and shape), so the targets are soft: every image a caption is compatible with (by the colour
and shape it names) is a positive, weighted equally. The projections and the image encoder are thrown away after the
phase; the U-Net reads the text encoder's last hidden state, as SD 1.x reads CLIP's (the SDXL toy: each encoder's
penultimate one). An encoder with its own text_projection (a CLIP text model with projection: the SDXL toy's
text_encoder_2) is trained through it instead of a throw-away one and keeps it: its projected pooled embedding is
what SDXL's U-Net reads, as OpenCLIP bigG's contrastive projection is.
"""
from __future__ import annotations

import argparse
import logging
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from utils.toy.language import COLOURS, SHAPES, fill, parse_prompt, prompt_sets

INIT_LOGIT_SCALE = math.log(1 / 0.07)  # CLIP's initial temperature 0.07
MAX_LOGIT_SCALE = math.log(100.0)  # CLIP clips the learned scale at 100


class ImageEncoder(torch.nn.Module):
    """Three strided convolutions (32 -> 16 -> 8 -> 4 pixels), global average pooling and a linear projection."""

    def __init__(self, dim: int, width: int = 32):
        super().__init__()
        self.convs = torch.nn.Sequential(
            torch.nn.Conv2d(3, width, 3, stride=2, padding=1), torch.nn.GELU(),
            torch.nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), torch.nn.GELU(),
            torch.nn.Conv2d(2 * width, 4 * width, 3, stride=2, padding=1), torch.nn.GELU())
        self.proj = torch.nn.Linear(4 * width, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images (n, 3, 32, 32) in [-1, 1] -> embeddings (n, dim)."""
        return self.proj(self.convs(x).mean(dim=(2, 3)))


class ClipHeads(torch.nn.Module):
    """What the contrastive phase trains besides the text encoder: the image encoder, the text projection (CLIP's
    text_projection on the pooled end-of-text state; None: the encoder's own) and the temperature."""

    def __init__(self, text_width: int, dim: int, own_projection: bool = True):
        super().__init__()
        self.image = ImageEncoder(dim)
        self.text_projection = torch.nn.Linear(text_width, dim, bias=False) if own_projection else None
        self.logit_scale = torch.nn.Parameter(torch.tensor(INIT_LOGIT_SCALE))


def caption_labels(captions: list[str]) -> torch.Tensor:
    """(n, 2) colour and shape index each caption names (-1: not named; objects name both)."""
    out = []
    for cap in captions:
        c, s = parse_prompt(cap)
        out.append([list(COLOURS).index(c) if c else -1, SHAPES.index(s) if s else -1])
    return torch.tensor(out, dtype=torch.long).reshape(-1, 2)


def compatible(cap_labels: torch.Tensor, image_labels: torch.Tensor) -> torch.Tensor:
    """(captions, images) 1.0 where the caption fits the image: every colour and shape it names is the image's."""
    c = (cap_labels[:, None, 0] < 0) | (cap_labels[:, None, 0] == image_labels[None, :, 0])
    s = (cap_labels[:, None, 1] < 0) | (cap_labels[:, None, 1] == image_labels[None, :, 1])
    return (c & s).float()


def info_nce(text_emb: torch.Tensor, image_emb: torch.Tensor, logit_scale: torch.Tensor,
             match: torch.Tensor) -> torch.Tensor:
    """CLIP's symmetric InfoNCE with soft targets: each caption's positives are the images `match` marks (and each
    image's the captions), equally weighted; with match = identity it is CLIP's loss exactly."""
    logits = logit_scale.clamp(max=MAX_LOGIT_SCALE).exp() * F.normalize(text_emb, dim=-1) @ F.normalize(image_emb, dim=-1).T
    t2i = F.cross_entropy(logits, match / match.sum(1, keepdim=True))
    i2t = F.cross_entropy(logits.T, match.T / match.T.sum(1, keepdim=True))
    return (t2i + i2t) / 2


def project(out, heads: ClipHeads) -> torch.Tensor:
    """A text encoder's output -> the projected pooled (end-of-text) state (the heads' projection, or the encoder's)."""
    return out.text_embeds if heads.text_projection is None else heads.text_projection(out.pooler_output)


def text_embeddings(text_encoder, heads: ClipHeads, ids: torch.Tensor) -> torch.Tensor:
    """The projected pooled (end-of-text) state of each caption."""
    return project(text_encoder(ids), heads)


def contrastive_loss_fn(text_encoder, heads: ClipHeads, x_all: torch.Tensor, image_labels: torch.Tensor,
                        ids: torch.Tensor, cap_index: torch.Tensor, cap_probs: torch.Tensor, cap_labels: torch.Tensor,
                        batch_size: int):
    """The phase's loss_fn for utils.toy.train._resumable_loop: a batch of images, one caption drawn for each
    (cap_probs without the empty caption), soft-target InfoNCE over the batch."""

    def loss_fn(gen: torch.Generator):
        idx = torch.randint(len(x_all), (batch_size,), generator=gen)
        pick = torch.multinomial(cap_probs[idx], 1, generator=gen).squeeze(1)
        caps = cap_index[idx, pick]
        match = compatible(cap_labels[caps], image_labels[idx])
        # each distinct caption encoded once (the same numbers, a fraction of the cost)
        distinct, inverse = torch.unique(caps, return_inverse=True)
        text = text_embeddings(text_encoder, heads, ids[distinct])[inverse]
        loss = info_nce(text, heads.image(x_all[idx]), heads.logit_scale, match)
        return loss, {"scale": heads.logit_scale.exp().item()}

    return loss_fn


@torch.no_grad()
def measure_text_encoder(text_encoder, heads: ClipHeads, tokenizer, x_all: torch.Tensor, image_labels: torch.Tensor,
                         an: bool = True, hidden_layer: int | None = None) -> dict:
    """Retrieval of (colour, shape) from captions against the 18 classes' mean image embeddings (explicit, held-out
    paraphrase and object prompts), and the cosine similarities of the hidden states the U-Net reads (None: the last;
    the SDXL toy's: -2), flattened over the 16 positions, of "red" and of "a red circle" to "" and to the other
    colours' same prompts."""
    text_encoder.eval(), heads.eval()
    img = F.normalize(torch.cat([heads.image(x_all[i:i + 512]) for i in range(0, len(x_all), 512)]), dim=-1)
    cls = image_labels[:, 0] * len(SHAPES) + image_labels[:, 1]
    protos = F.normalize(torch.stack([img[cls == k].mean(0) for k in range(len(COLOURS) * len(SHAPES))]), dim=-1)

    def encode(prompts: list[str]):
        ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids
        out = text_encoder(ids, output_hidden_states=hidden_layer is not None)
        hidden = out.last_hidden_state if hidden_layer is None else out.hidden_states[hidden_layer]
        return F.normalize(project(out, heads), dim=-1), hidden.flatten(1)

    res: dict = {"retrieval": {}}
    for kind in ("explicit", "paraphrase", "implied"):
        prompts = [(p, c, s) for c in COLOURS for p, s in prompt_sets(c, an)[kind] if s is not None]
        emb, _ = encode([p for p, _, _ in prompts])
        truth = torch.tensor([list(COLOURS).index(c) * len(SHAPES) + SHAPES.index(s) for _, c, s in prompts])
        res["retrieval"][kind] = float(((emb @ protos.T).argmax(1) == truth).float().mean())
    for template in ("{c}", "a {c} circle"):
        names = [fill(template.format(c=c), an=an) for c in COLOURS]
        _, hidden = encode(["", *names])
        cos = F.cosine_similarity(hidden[1:2], hidden, dim=-1).tolist()
        key = template.format(c="red")
        res[f"cos({key!r}, .)"] = {"''": cos[0], **{n: v for n, v in zip(names[1:], cos[2:])}}
    return res


def train_text_encoder(text_encoder, images: np.ndarray, labels: list[tuple[str, str]], tokenizer,
                       args: argparse.Namespace, ckpt_dir: Path, log: logging.Logger, name: str = "text_encoder",
                       seed_offset: int = 0, hidden_layer: int | None = None) -> dict:
    """The contrastive phase `name` (its checkpoints' folder): trains `text_encoder` (with a throw-away image encoder,
    temperature and, unless it has its own, text projection; seeds args.seed + 4 + seed_offset and + 5 + seed_offset),
    logs and returns measure_text_encoder's numbers; the encoder leaves frozen (eval, requires_grad False)."""
    from utils.toy.train import _resumable_loop, _to_unit, caption_list, caption_table

    projects = hasattr(text_encoder, "text_projection")  # the SDXL toy's text_encoder_2: trained through its own
    if projects and text_encoder.config.projection_dim != args.clip_dim:
        raise ValueError(f"{name}'s projection is {text_encoder.config.projection_dim} wide, not --clip_dim "
                         f"{args.clip_dim}")
    torch.manual_seed(args.seed + 4 + seed_offset)  # the heads' initial weights (the text encoder's come from build)
    heads = ClipHeads(text_encoder.config.hidden_size, args.clip_dim, own_projection=not projects)
    ids, cap_index, cap_probs = caption_table(tokenizer, labels, an=args.articles == "an", empty=0.0)
    # the pooled state sits at the first end-of-text token and the encoder is causal, so the padding after the longest
    # caption's end changes nothing the loss sees: cut it (a third of the positions, a third of the cost)
    ids = ids[:, :int((ids == tokenizer.eos_token_id).int().argmax(1).max()) + 1]
    captions = caption_list(args.articles == "an")
    x_all = _to_unit(images)
    image_labels = torch.tensor([[list(COLOURS).index(c), SHAPES.index(s)] for c, s in labels])
    loss_fn = contrastive_loss_fn(text_encoder, heads, x_all, image_labels, ids, cap_index, cap_probs,
                                  caption_labels(captions), args.clip_batch_size)
    modules = {name: text_encoder, "clip_heads": heads}
    _resumable_loop(name, modules, [p for m in modules.values() for p in m.parameters()], args.clip_lr, 0.1,
                    args.clip_steps, args.seed + 5 + seed_offset, loss_fn, args, ckpt_dir, log)  # CLIP's decay 0.1
    res = measure_text_encoder(text_encoder, heads, tokenizer, x_all, image_labels, args.articles == "an", hidden_layer)
    log.info("%s (width %d): %s", name.replace("_", " "), text_encoder.config.hidden_size, res)
    text_encoder.requires_grad_(False)
    return res
