"""CLIP score with a transformers CLIPModel, caption = prefix + prompt: the mean cosine of image and caption embeddings
(the SDD paper's form: SD 0.2771), and 100 * max(cos, 0) (the CLIPScore of Hessel et al. without its 2.5 weight)."""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from utils.cli import UserError, resolve_device
from utils.eval.common import guard_outputs, load_image_folder, load_rgb, output_dir, split_categories, write_csv, write_json

log = logging.getLogger("sdd")

DEFAULT_CLIP = "openai/clip-vit-large-patch14"
DEFAULT_PREFIX = "A photo depicts "
SCORES_CSV, SUMMARY_JSON = "clip_scores.csv", "clip_summary.json"
SCORE = "mean cosine"  # the `score` field of clip_summary.json: what `mean` and `std` are


def _image_processor_class():
    """transformers 5's PIL backend (no torchvision needed), else the classic CLIPImageProcessor."""
    try:
        from transformers import CLIPImageProcessorPil
        return CLIPImageProcessorPil
    except ImportError:
        from transformers import CLIPImageProcessor
        return CLIPImageProcessor


def load_clip(name: str, device: torch.device | str = "cpu"):
    """(model, tokenizer, image processor) from a hub id or a local save_pretrained folder; one-line errors."""
    from transformers import CLIPModel, CLIPTokenizer

    from utils.loading import from_pretrained

    path = Path(name).expanduser()
    if not path.exists() and (os.path.isabs(name) or name.startswith((".", "~")) or name.count("/") > 1):
        raise UserError(f"CLIP model folder {name} does not exist")
    model = from_pretrained(CLIPModel, name)
    tokenizer = from_pretrained(CLIPTokenizer, name)
    processor = from_pretrained(_image_processor_class(), name)
    return model.to(device).eval(), tokenizer, processor


@torch.no_grad()
def clip_cosines(model, tokenizer, processor, images: Sequence[Image.Image | str | os.PathLike],
                 captions: Sequence[str], batch_size: int = 32, device: torch.device | str = "cpu") -> np.ndarray:
    """Cosine between each image's and its caption's CLIP embedding (captions cut to the tokenizer's length)."""
    if len(images) != len(captions):
        raise ValueError(f"{len(images)} images but {len(captions)} captions")
    max_len = min(int(tokenizer.model_max_length), int(model.config.text_config.max_position_embeddings))
    out: list[np.ndarray] = []
    for i in tqdm(range(0, len(images), batch_size), desc="clip", unit="batch"):
        ims = [im if isinstance(im, Image.Image) else load_rgb(im) for im in images[i:i + batch_size]]
        pixels = processor(images=ims, return_tensors="pt")["pixel_values"].to(device, model.dtype)
        text = tokenizer(list(captions[i:i + batch_size]), padding=True, truncation=True, max_length=max_len,
                         return_tensors="pt").to(device)
        img = _as_tensor(model.get_image_features(pixel_values=pixels))
        txt = _as_tensor(model.get_text_features(**text))
        cos = torch.nn.functional.cosine_similarity(img.float(), txt.float(), dim=-1)
        out.append(cos.cpu().numpy())
    return np.concatenate(out).astype(np.float64)


def _as_tensor(features) -> torch.Tensor:
    """get_*_features returns a tensor (transformers 4) or an output object with pooler_output (transformers 5)."""
    if isinstance(features, torch.Tensor):
        return features
    for key in ("pooler_output", "image_embeds", "text_embeds"):
        value = getattr(features, key, None)
        if isinstance(value, torch.Tensor):
            return value
    raise TypeError(f"unexpected CLIP feature output {type(features).__name__}")


def _stats(cosines: np.ndarray) -> dict:
    """images, mean and std (ddof 1) of the cosines, and the same of 100 * max(cos, 0)."""
    score_100 = 100.0 * np.clip(cosines, 0, None)
    spread = (lambda v: float(v.std(ddof=1)) if len(v) > 1 else 0.0)
    return dict(images=int(len(cosines)), mean=float(cosines.mean()), std=spread(cosines),
                clip_score_100=dict(mean=float(score_100.mean()), std=spread(score_100)))


def evaluate_clip(folder: str | os.PathLike, out_dir: str | os.PathLike | None = None, model_name: str = DEFAULT_CLIP,
                  prompt_prefix: str = DEFAULT_PREFIX, batch_size: int = 32, device: str | None = None) -> dict:
    """CLIP score of every image against its prompt; write clip_scores.csv and clip_summary.json."""
    images = load_image_folder(folder)
    prompts = images.prompts
    if prompts is None:
        raise UserError(f"the CLIP score needs each image's prompt: {images.root} has no metadata.csv with a "
                        f"`prompt` column (write the folder with generate.py)")
    out = output_dir(folder, out_dir)
    targets = [out / SCORES_CSV, out / SUMMARY_JSON]
    guard_outputs(targets, images.paths)
    dev = resolve_device(device)
    model, tokenizer, processor = load_clip(model_name, dev)
    cosines = clip_cosines(model, tokenizer, processor, images.paths, [prompt_prefix + p for p in prompts],
                           batch_size, dev)
    table = images.carried().drop(columns=["clip_cosine", "clip_score_100"], errors="ignore")
    table["clip_cosine"] = cosines
    table["clip_score_100"] = 100.0 * np.clip(cosines, 0, None)
    summary = dict(metric="clip", folder=str(images.root), model=model_name, prompt_prefix=prompt_prefix,
                   score=SCORE, **_stats(cosines))
    summary["clip_score_100"]["definition"] = "100 * max(cos, 0) per image"
    if "categories" in images.records.columns:
        groups: dict[str, list[float]] = {}
        for cats, c in zip(images.records["categories"], cosines):
            for cat in split_categories(cats):
                groups.setdefault(cat, []).append(float(c))
        summary["per_category"] = {c: _stats(np.array(v)) for c, v in sorted(groups.items())}
    write_csv(targets[0], table)
    write_json(targets[1], summary)
    log.info("clip %s: %d images, mean cosine %.4f std %.4f, 100*max(cos,0) %.3f (%s, prefix %r)", images.root,
             summary["images"], summary["mean"], summary["std"], summary["clip_score_100"]["mean"], model_name,
             prompt_prefix)
    return summary
