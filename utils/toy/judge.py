"""The toy world's judge: colour and shape of an image's main blob from pixels alone, and same-seed preservation.

Colour: the median colour of the blob's interior (its edge pixels blend with the white background) is a class only
when it lies within COLOUR_RADIUS of that palette colour (RGB distance); anything else is "other", so an orange
drawn for a yellow prompt is not counted as yellow. Shape: the fill ratio of the blob's bounding box (square 1,
circle pi/4, triangle 1/2). Preservation: the same prompt and seed drawn by two models gives the same colour and
shape, and the two blobs overlap (IoU >= IOU_PRESERVED). nearest_colour() is the lenient reading (the nearest palette
colour at any distance), an upper bound of how often an erased colour still shows.
"""
from __future__ import annotations

import numpy as np
from PIL import Image

from utils.toy.language import COLOURS

OTHER = "other"
# less than half the distance between the closest palette pair (orange and yellow, 80 apart): classes never overlap
COLOUR_RADIUS = 36.0
IOU_PRESERVED = 0.7
_FG_THRESHOLD = 96  # a pixel is foreground when some channel is this far below white
_MIN_PIXELS = 16  # fewer foreground pixels in the largest blob: no clear shape
_MAX_ASPECT = 1.6  # a bounding box more elongated than this is no clear shape
_FILL_SQUARE = 0.89  # fill-ratio thresholds near the midpoints of square 1, circle pi/4 and triangle 1/2
_FILL_CIRCLE = 0.655
_FILL_TRIANGLE = 0.36
_PALETTE = np.array(list(COLOURS.values()), dtype=np.float64)


def _as_array(image: Image.Image | np.ndarray) -> np.ndarray:
    arr = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)
    if arr.ndim != 3 or arr.shape[-1] != 3:
        raise ValueError(f"judge expects an RGB image (H, W, 3), got shape {arr.shape}")
    if arr.dtype != np.uint8:  # floats in [0, 1]
        arr = (np.clip(arr, 0, 1) * 255).round().astype(np.uint8)
    return arr


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
            for v in range(max(y - 1, 0), min(y + 2, h)):
                for u in range(max(x - 1, 0), min(x + 2, w)):
                    if mask[v, u] and not seen[v, u]:
                        seen[v, u] = True
                        stack.append((v, u))
        out.append(comp)
    return out


def _erode(mask: np.ndarray) -> np.ndarray:
    """3x3 erosion (pixels whose 8 neighbours are all in the mask)."""
    p = np.pad(mask, 1)
    h, w = mask.shape
    return np.logical_and.reduce([p[1 + dy:1 + dy + h, 1 + dx:1 + dx + w] for dy in (-1, 0, 1) for dx in (-1, 0, 1)])


def judge_features(image: Image.Image | np.ndarray) -> dict | None:
    """The largest foreground blob: mask, pixels, bbox height/width, fill ratio, aspect, colour; None if too small."""
    arr = _as_array(image)
    mask = (255 - arr.astype(np.int16).min(axis=-1)) > _FG_THRESHOLD
    if mask.sum() < _MIN_PIXELS:
        return None
    blobs = _components(mask)
    blob = max(blobs, key=lambda m: int(m.sum()))
    pixels = int(blob.sum())
    if pixels < _MIN_PIXELS:
        return None
    rows, cols = np.nonzero(blob)
    h, w = int(rows.max() - rows.min() + 1), int(cols.max() - cols.min() + 1)
    core = _erode(blob)
    colour_pixels = arr[core] if core.sum() >= 4 else arr[blob]
    return dict(mask=blob, pixels=pixels, height=h, width=w, fill=pixels / (h * w), aspect=max(h, w) / min(h, w),
                rgb=np.median(colour_pixels.astype(np.float64), axis=0), blobs=len(blobs))


def _nearest(rgb: np.ndarray) -> tuple[str, float]:
    """The palette colour nearest `rgb` and its RGB distance."""
    d = np.sqrt(((_PALETTE - np.asarray(rgb, dtype=np.float64)) ** 2).sum(axis=1))
    i = int(np.argmin(d))
    return list(COLOURS)[i], float(d[i])


def colour_class(rgb: np.ndarray) -> str:
    """The palette colour within COLOUR_RADIUS of `rgb`, else "other"."""
    name, dist = _nearest(rgb)
    return name if dist <= COLOUR_RADIUS else OTHER


def nearest_colour(image: Image.Image | np.ndarray) -> str | None:
    """The palette colour nearest the main blob's colour at any distance (None: no blob). The lenient reading: a
    crimson drawn for "red" is "other" to judge() but "red" here, so its rate bounds an erased colour's from above."""
    f = judge_features(image)
    return None if f is None else _nearest(f["rgb"])[0]


def shape_class(f: dict) -> str | None:
    """square / circle / triangle from the blob's fill ratio, None when elongated or too sparse."""
    fill = f["fill"]
    if f["aspect"] > _MAX_ASPECT or fill < _FILL_TRIANGLE:
        return None
    return "square" if fill >= _FILL_SQUARE else "circle" if fill >= _FILL_CIRCLE else "triangle"


def judge(image: Image.Image | np.ndarray) -> tuple[str | None, str | None]:
    """(colour, shape) of the main shape: a palette colour or "other", and a shape; None for what is not there."""
    f = judge_features(image)
    if f is None:
        return None, None
    return colour_class(f["rgb"]), shape_class(f)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two boolean masks (0 when both are empty)."""
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 0.0


def preserved(before: Image.Image | np.ndarray, after: Image.Image | np.ndarray) -> bool:
    """Same judged colour and shape (both clear) and blob masks with IoU >= IOU_PRESERVED."""
    fa, fb = judge_features(before), judge_features(after)
    if fa is None or fb is None:
        return False
    ca, cb = colour_class(fa["rgb"]), colour_class(fb["rgb"])
    sa, sb = shape_class(fa), shape_class(fb)
    return ca == cb != OTHER and sa == sb is not None and iou(fa["mask"], fb["mask"]) >= IOU_PRESERVED
