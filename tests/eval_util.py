"""Helpers shared by the evaluation tests: evaluate.py in-process, folders of drawn shapes, a tiny CLIP model."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image, ImageDraw

import evaluate

COLOURS = [(220, 30, 30), (30, 60, 220), (30, 160, 50), (240, 200, 20), (120, 40, 160), (20, 20, 20)]


def cli(*argv: str) -> dict:
    """Run evaluate.py in-process the way the script does."""
    return evaluate.main(evaluate.parse_args([str(a) for a in argv]))


def make_folder(path: Path, n: int, seed: int = 0, size: int = 64, metadata: bool = True, **columns) -> Path:
    """n images of a coloured shape on a coloured background, plus generate.py's metadata.csv."""
    rng = np.random.default_rng(seed)
    path.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        bg, fg = COLOURS[rng.integers(len(COLOURS))], COLOURS[(i + seed) % len(COLOURS)]
        im = Image.new("RGB", (size, size), bg)
        box = tuple(int(v) for v in (*rng.integers(0, size // 3, 2), *rng.integers(2 * size // 3, size, 2)))
        (ImageDraw.Draw(im).ellipse if i % 2 else ImageDraw.Draw(im).rectangle)(box, fill=fg)
        name = f"{i:05d}.png"
        im.save(path / name)
        rows.append(dict(file=name, prompt=f"a photo of shape {i}", seed=seed + i, guidance=7.5, mode="base",
                         config="", unet="", **{k: v[i] for k, v in columns.items()}))
    if metadata:
        pd.DataFrame(rows).to_csv(path / "metadata.csv", index=False)
    return path


def make_tiny_clip(folder: Path) -> Path:
    """A random tiny CLIPModel + our tokenizer + a PIL image processor, saved like a hub checkpoint."""
    from transformers import CLIPConfig, CLIPModel

    from utils.eval.clip import _image_processor_class
    from utils.tokenizer import write_clip_tokenizer

    tok = write_clip_tokenizer(folder, ["a", "photo", "depicts", "of", "shape", "image"], model_max_length=16)
    torch.manual_seed(0)
    text = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=16, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                  patch_size=8)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    _image_processor_class()(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder
