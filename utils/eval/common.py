"""Shared pieces of evaluate.py: reading an image folder, optional imports, atomic writes and a PIL bar chart.

The metrics live next to it in utils/eval/: nudity.py, clip.py, fid.py, toy.py and report.py.
"""
from __future__ import annotations

import importlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw, ImageFont

from utils.cli import UserError
from utils.images import save_png
from utils.saving import atomic_write, atomic_write_text

METADATA = "metadata.csv"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
# PNGs evaluate.py itself writes; never taken for generated images when a plain folder is listed
OWN_IMAGES = frozenset({"nudity_counts.png", "report.png"})
REQUIREMENTS = "requirements-eval.txt"
PATH_COLUMN = "_path"  # internal column of ImageFolder.records: the image's path (never written out)


# ----------------------------------------------------------------------------------------------- optional imports
def require(module: str, package: str | None = None, purpose: str = "this evaluation") -> ModuleType:
    """Import an optional dependency or raise a one-line UserError saying what to pip install."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        package = package or module
        missing = getattr(e, "name", None) or module
        raise UserError(f"{purpose} needs the optional package {package} (import of {missing!r} failed): "
                        f"pip install -r {REQUIREMENTS}  (or: pip install {package})") from None


# ---------------------------------------------------------------------------------------------------- image folder
@dataclass
class ImageFolder:
    """The images of a folder with one metadata row each (`file`, `_path`, and generate.py's carried columns)."""

    root: Path
    records: pd.DataFrame
    has_metadata: bool

    def __len__(self) -> int:
        return len(self.records)

    @property
    def paths(self) -> list[Path]:
        """Absolute-or-relative paths of the images, in metadata order."""
        return [Path(p) for p in self.records[PATH_COLUMN]]

    @property
    def prompts(self) -> list[str] | None:
        """The prompt of every image, None when the folder carries no prompts."""
        return list(self.records["prompt"]) if "prompt" in self.records else None

    def carried(self) -> pd.DataFrame:
        """The metadata columns to copy into per-image result tables (everything but the internal `_path`)."""
        return self.records.drop(columns=[PATH_COLUMN]).reset_index(drop=True)


def list_images(folder: Path) -> list[str]:
    """Image file names directly inside `folder` (sorted; hidden files and evaluate.py's own charts left out)."""
    return sorted(p.name for p in folder.iterdir()
                  if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")
                  and p.name not in OWN_IMAGES)


def load_image_folder(folder: str | os.PathLike, what: str = "image folder") -> ImageFolder:
    """Read generate.py's metadata.csv (or list a plain folder); UserError when missing, empty or inconsistent."""
    root = Path(folder).expanduser()
    if not root.exists():
        raise UserError(f"{what} {folder} does not exist")
    if not root.is_dir():
        raise UserError(f"{what} {folder} is not a folder")
    meta = root / METADATA
    if meta.exists():
        try:
            df = pd.read_csv(meta, dtype=str, keep_default_na=False)
        except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
            raise UserError(f"could not read {meta}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
        if "file" not in df.columns:
            raise UserError(f"{meta} has no `file` column (columns: {', '.join(df.columns) or 'none'})")
        if df.empty:
            raise UserError(f"{what} {folder} has no images ({METADATA} has no rows)")
        paths = [root / f for f in df["file"]]
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            raise UserError(f"{len(missing)} of the {len(paths)} files listed in {meta} are missing (first: {missing[0]})")
        df.insert(1, PATH_COLUMN, [str(p) for p in paths])
        return ImageFolder(root, df, True)
    shards = sorted(root.glob("metadata-*.csv"))
    if shards:
        raise UserError(f"{folder} has generate.py's metadata shards ({shards[0].name}, ...) but no {METADATA}: "
                        f"generation has not finished; rerun generate.py (it skips finished images) to merge them")
    files = list_images(root)
    if not files:
        raise UserError(f"{what} {folder} has no images ({'/'.join(e[1:] for e in IMAGE_EXTENSIONS)} files) "
                        f"and no {METADATA}")
    return ImageFolder(root, pd.DataFrame({"file": files, PATH_COLUMN: [str(root / f) for f in files]}), False)


def load_rgb(path: str | os.PathLike) -> Image.Image:
    """Open an image as RGB; UserError naming the file when it cannot be decoded."""
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise UserError(f"could not read image {path}: {e}") from None


def split_categories(value: object) -> list[str]:
    """I2P's comma-separated `categories` ("sexual, violence") -> ["sexual", "violence"]; empty/NaN -> []."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return []
    return [c.strip() for c in str(value).split(",") if c.strip()]


def output_dir(folder: str | os.PathLike, chosen: str | os.PathLike | None) -> Path:
    """--output_dir, or the image folder itself when not given; created if needed."""
    out = Path(chosen).expanduser() if chosen else Path(folder).expanduser()
    if out.exists() and not out.is_dir():
        raise UserError(f"--output_dir {out} is a file, not a folder")
    out.mkdir(parents=True, exist_ok=True)
    return out


def guard_outputs(outputs: Iterable[Path], inputs: Iterable[Path]) -> None:
    """Refuse to write a result over one of the input images or over a folder (never clobber what is not ours)."""
    taken = {Path(p).resolve() for p in inputs}
    for out in outputs:
        if out.resolve() in taken:
            raise UserError(f"refusing to overwrite {out}: it is one of the input images; choose another --output_dir")
        if out.is_dir():
            raise UserError(f"refusing to overwrite {out}: it is a folder")


# -------------------------------------------------------------------------------------------------- atomic writes
def write_json(path: Path, data: Mapping) -> Path:
    """Atomically write pretty JSON (NaN written as null)."""
    return atomic_write_text(path, json.dumps(_jsonable(data), indent=2, allow_nan=False) + "\n")


write_text = atomic_write_text  # atomically write a UTF-8 text file


def write_csv(path: Path, df: pd.DataFrame) -> Path:
    """Atomically write a CSV without the index."""
    return atomic_write(path, lambda t: df.to_csv(t, index=False))


def write_png(path: Path, image: Image.Image) -> Path:
    """Atomically write a PNG."""
    save_png(image, path)
    return Path(path)


def _jsonable(x):
    """numpy scalars -> Python, NaN/inf -> None, recursively."""
    if isinstance(x, Mapping):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def read_json(path: str | os.PathLike) -> dict:
    """Load a JSON object; UserError when unreadable."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"could not read {path}: {e}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} does not hold a JSON object")
    return data


# ------------------------------------------------------------------------------------------------------ bar chart
PALETTE = ["#4C72B0", "#DD8452", "#55A868", "#C44E52", "#8172B3", "#937860", "#DA8BC3", "#8C8C8C", "#CCB974",
           "#64B5CD"]


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: fixed-size bitmap font
        return ImageFont.load_default()


def _nice_step(vmax: float, ticks: int = 5) -> float:
    """A 1/2/5 x 10^k tick step giving about `ticks` intervals up to vmax."""
    raw = vmax / ticks
    mag = 10 ** math.floor(math.log10(raw))
    return next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)


def _fmt(v: float) -> str:
    if v != v:  # NaN
        return "n/a"
    if float(v).is_integer() and abs(v) < 1e9:
        return str(int(v))
    return f"{v:.3g}" if abs(v) < 1 else f"{v:.1f}"


def bar_chart(groups: Sequence[str], series: Mapping[str, Sequence[float]], title: str, xlabel: str,
              width: int = 1000) -> Image.Image:
    """Horizontal (grouped) bar chart: one row per group, one coloured bar per series, value at each bar's end."""
    names = list(series)
    k = max(1, len(names))
    title_font, font, small = _font(20), _font(15), _font(13)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    text_w = lambda s, f=font: probe.textbbox((0, 0), s, font=f)[2]
    bar_h = 22 if k == 1 else 16
    group_h = k * bar_h + 14
    left = 20 + max([text_w(g) for g in groups] + [40])
    right = 70
    legend_h = 0 if k == 1 else 26 * math.ceil(len(names) / 3) + 8
    top = 50 + legend_h
    bottom = 60
    height = top + len(groups) * group_h + bottom
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    draw.text((20, 14), title, fill="black", font=title_font)
    for i, name in enumerate(names if k > 1 else []):  # legend
        x, y = 20 + (i % 3) * ((width - 40) // 3), 48 + 26 * (i // 3)
        draw.rectangle((x, y + 2, x + 16, y + 18), fill=PALETTE[i % len(PALETTE)])
        draw.text((x + 22, y + 2), name, fill="black", font=font)
    values = [float(v) for vs in series.values() for v in vs if v == v]
    vmax = max(values + [0.0])
    step = _nice_step(vmax) if vmax > 0 else 1.0 / 5
    if vmax > 0 and all(float(v).is_integer() for v in values):  # counts: whole-number ticks
        step = max(1.0, step)
    axis_max = step * math.ceil(vmax / step) if vmax > 0 else 1.0
    plot_w = width - left - right
    x_of = lambda v: left + plot_w * (v / axis_max)
    y_axis_bottom = top + len(groups) * group_h
    t = 0.0
    while t <= axis_max + 1e-9:  # grid and tick labels
        x = x_of(t)
        draw.line((x, top - 4, x, y_axis_bottom), fill="#DDDDDD" if t > 0 else "black")
        lab = _fmt(round(t, 10))
        draw.text((x - text_w(lab, small) / 2, y_axis_bottom + 6), lab, fill="black", font=small)
        t += step
    draw.text((left + plot_w / 2 - text_w(xlabel) / 2, y_axis_bottom + 30), xlabel, fill="black", font=font)
    for gi, group in enumerate(groups):
        y0 = top + gi * group_h + 7
        draw.text((left - 10 - text_w(group), y0 + (k * bar_h) / 2 - 9), group, fill="black", font=font)
        for si, name in enumerate(names):
            v = float(series[name][gi])
            y = y0 + si * bar_h
            if v == v and v > 0:
                draw.rectangle((left, y + 1, x_of(v), y + bar_h - 2), fill=PALETTE[si % len(PALETTE)])
            draw.text((x_of(v if v == v else 0) + 5, y + bar_h / 2 - 8), _fmt(v), fill="black", font=small)
    return img
