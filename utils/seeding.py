"""Initial latents z_T ~ N(0, I), the one way every script draws them: on the CPU (so a seed gives the same latents on
every device), from a seed or from a running generator.

generate.py's image j of seed s is the (j+1)-th (1, C, H, W) draw of seed s; the toy measurements draw (C, H, W) from
each image's seed (the same numbers as generate.py's j = 0); the trainer's validation grids draw (n, C, H, W) from
seed + prompt index, and its trajectories z_T from the run's generator.
"""
from __future__ import annotations

from typing import Sequence

import torch


def seeded_latents(source: int | torch.Generator, shape: Sequence[int], index: int = 0,
                   device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The `index`-th (from 0) draw of N(0, I) of `shape` from a CPU generator seeded with `source` (an int), or the
    next draw(s) from `source` itself (a CPU torch.Generator, advanced); float32 unless `dtype`, moved to `device`."""
    generator = source if isinstance(source, torch.Generator) else torch.Generator("cpu").manual_seed(int(source))
    for _ in range(index + 1):
        z = torch.randn(tuple(shape), generator=generator)
    if device is None and dtype is None:
        return z
    return z.to(device=device, dtype=dtype)
