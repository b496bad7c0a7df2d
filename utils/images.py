"""Image grids a person can look at."""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw

from utils.saving import atomic_write


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) floats in [0, 1] -> PIL images."""
    arr = (images.permute(0, 2, 3, 1).cpu().float().numpy() * 255).round().astype(np.uint8)
    return [Image.fromarray(a) for a in arr]


def image_grid(rows: Sequence[Sequence[Image.Image]], labels: Sequence[str] | None = None, label_width: int = 0,
               pad: int = 2) -> Image.Image:
    """Rows of equally sized images on a white canvas, each row optionally labelled on its left."""
    w, h = rows[0][0].size
    cols = max(len(r) for r in rows)
    lw = label_width if labels else 0
    grid = Image.new("RGB", (lw + cols * (w + pad) + pad, len(rows) * (h + pad) + pad), "white")
    draw = ImageDraw.Draw(grid)
    for i, row in enumerate(rows):
        y = pad + i * (h + pad)
        if labels:
            draw.text((4, y + h // 2 - 5), labels[i][: max(1, lw // 6)], fill="black")
        for j, im in enumerate(row):
            grid.paste(im.convert("RGB"), (lw + pad + j * (w + pad), y))
    return grid


def save_png(image: Image.Image, path: str | os.PathLike) -> None:
    """Save through a temp name and a rename, so no half-written PNG survives."""
    atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))
