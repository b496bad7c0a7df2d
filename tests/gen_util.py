"""Helpers shared by the generation tests: generate.py in-process with tiny settings and image comparisons (their
prompt file and reference run are fixtures in conftest.py)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from generate import main, parse_args

STEPS = "2"


def generate(model: Path, prompt_path: Path, image_dir: Path, *flags: str) -> dict:
    """Run generate.py's main in-process with tiny settings."""
    return main(parse_args(["--pretrained_model_name_or_path", str(model), "--prompt_path", str(prompt_path),
                            "--image_dir", str(image_dir), "--num_inference_steps", STEPS, *flags]))


def pixels(path: Path) -> np.ndarray:
    """The PNG's pixels."""
    with Image.open(path) as im:
        return np.asarray(im).copy()


def pngs(folder: Path) -> list[str]:
    """The PNG names in a folder (no temp files)."""
    return sorted(p.name for p in folder.glob("*.png"))


def assert_same_images(a: Path, b: Path, names: list[str] | None = None) -> None:
    """Same PNG names (or the given ones) with the same pixels in both folders."""
    if names is None:
        names = pngs(a)
        assert pngs(b) == names
    for name in names:
        assert np.array_equal(pixels(a / name), pixels(b / name)), name


def metadata(folder: Path) -> pd.DataFrame:
    """metadata.csv as text cells."""
    return pd.read_csv(folder / "metadata.csv", dtype=str, keep_default_na=False)
