"""Helpers shared by the erasure tests on the shipped toy model: where it is, and how often prompts show their colour."""
from __future__ import annotations

from pathlib import Path

import pytest

from utils.toy import judge, nearest_colour
from utils.toy import measure as M

ROOT = Path(__file__).resolve().parents[1]
TOY = ROOT / "assets" / "toy-sd"
needs_toy = pytest.mark.usefixtures("shipped_toy")  # conftest.py: a missing model fails the test, never skips it


def colour_rates(unet: Path | None, prompts: list[tuple[str, str]], n: int = 4,
                 lenient: bool = False) -> dict[str, float]:
    """For each prompt, the share of its n images (seeds fixed by the prompt) that the judge sees in its colour
    (lenient: whose colour is nearer that palette colour than any other, at any distance)."""
    images = M.draw(M.load_pipeline(TOY, unet), [M.Item(p, M.image_seed(p, j, 7), "", c, None)
                                                 for p, c in prompts for j in range(n)])
    read = nearest_colour if lenient else (lambda im: judge(im)[0])
    return {p: sum(read(im) == c for im in images[i * n:(i + 1) * n]) / n for i, (p, c) in enumerate(prompts)}
