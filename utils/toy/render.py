"""Rendering the toy world's images: one filled shape in a palette colour on white, random size and position."""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from utils.toy.language import COLOURS, SHAPES

RESOLUTION = 32
BACKGROUND = (255, 255, 255)
_SUPERSAMPLE = 4
_SIZE_RANGE = (10.0, 24.0)  # side of the shape's bounding box, in pixels


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


def make_dataset(n: int, seed: int = 0) -> tuple[np.ndarray, list[tuple[str, str]]]:
    """`n` images as uint8 (n, 32, 32, 3) and their (colour, shape); colours and shapes balanced (shuffled cycle)."""
    rng = np.random.default_rng(seed)
    pairs = [(c, s) for c in COLOURS for s in SHAPES]
    order = np.concatenate([rng.permutation(len(pairs)) for _ in range(-(-n // len(pairs)))])[:n]
    images = np.empty((n, RESOLUTION, RESOLUTION, 3), dtype=np.uint8)
    labels = [pairs[i] for i in order]
    for i, (c, s) in enumerate(labels):
        images[i] = np.asarray(render(c, s, rng))
    return images, labels
