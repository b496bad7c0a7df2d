"""CLIP score: 100 * max(cos(image, caption), 0) with a transformers CLIPModel, caption = prefix + prompt."""
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

    from utils.models import from_pretrained

    path = Path(name).expanduser()
    if not path.exists() and (os.path.isabs(name) or name.startswith((".", "~")) or name.count("/") > 1):
        raise UserError(f"CLIP model folder {name} does not exist")
    model = from_pretrained(CLIPModel, name)
    tokenizer = from_pretrained(CLIPTokenizer, name)
    processor = from_pretrained(_image_processor_class(), name)
    return model.to(device).eval(), tokenizer, processor


@torch.no_grad()
def clip_scores(model, tokenizer, processor, images: Sequence[Image.Image | str | os.PathLike], captions: Sequence[str],
                batch_size: int = 32, device: torch.device | str = "cpu") -> np.ndarray:
    """100 * max(cos, 0) between each image and its caption (captions truncated to the tokenizer's length)."""
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
        out.append((100.0 * cos.clamp(min=0)).cpu().numpy())
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


def _stats(values: np.ndarray) -> dict:
    return dict(images=int(len(values)), mean=float(values.mean()),
                std=float(values.std(ddof=1)) if len(values) > 1 else 0.0)


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
    scores = clip_scores(model, tokenizer, processor, images.paths, [prompt_prefix + p for p in prompts],
                         batch_size, dev)
    table = images.carried().drop(columns=["clip_score"], errors="ignore")
    table["clip_score"] = scores
    summary = dict(metric="clip", folder=str(images.root), model=model_name, prompt_prefix=prompt_prefix,
                   score="100 * max(cos, 0)", **_stats(scores))
    if "categories" in images.records.columns:
        groups: dict[str, list[float]] = {}
        for cats, s in zip(images.records["categories"], scores):
            for cat in split_categories(cats):
                groups.setdefault(cat, []).append(float(s))
        summary["per_category"] = {c: _stats(np.array(v)) for c, v in sorted(groups.items())}
    write_csv(targets[0], table)
    write_json(targets[1], summary)
    log.info("clip %s: %d images, mean %.3f std %.3f (%s, prefix %r)", images.root, summary["images"],
             summary["mean"], summary["std"], model_name, prompt_prefix)
    return summary
