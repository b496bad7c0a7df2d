"""Weight views: other models (EMA teacher, frozen original) as dicts of tensors for the trained subset only; the
family's predict (utils/families/base.py) runs the shared U-Net with one swapped in."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Mapping

import torch

from utils.families.base import View


def snapshot(params: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached copies of the subset: the starting point of a teacher or the frozen original."""
    return {n: p.detach().clone() for n, p in params.items()}


@torch.no_grad()
def ema_update(teacher: Mapping[str, torch.Tensor], student: Mapping[str, torch.Tensor], decay: float) -> None:
    """teacher <- m * teacher + (1 - m) * student, one fused lerp over the trained tensors (SDD's EMA, m = decay)."""
    names = list(teacher)
    torch._foreach_lerp_([teacher[n] for n in names], [student[n].detach() for n in names], 1.0 - decay)


@contextmanager
def swapped_in(module: torch.nn.Module, view: View) -> Iterator[torch.nn.Module]:
    """Temporarily point the module's parameters at `view`'s tensors (no copy), e.g. to save or sample with them."""
    params = dict(module.named_parameters())
    old = {n: params[n].data for n in view}
    try:
        for n, t in view.items():
            params[n].data = t
        yield module
    finally:
        for n, t in old.items():
            params[n].data = t
