"""The one registry of which U-Net parameters each fine-tuning method trains."""
from __future__ import annotations

from typing import Callable

import torch

_FROZEN_ENDS = ("time_embedding", "conv_out")  # ESD keeps the time embedding and the output layer fixed


def _edge(name: str) -> bool:
    return name.startswith(_FROZEN_ENDS)


FINETUNING_METHODS: dict[str, Callable[[str], bool]] = {
    "xattn": lambda n: ".attn2." in n,                                        # cross-attention (SDD and ESD-x default)
    "xattn-strict": lambda n: ".attn2.to_k." in n or ".attn2.to_v." in n,     # only the text-facing projections
    "noxattn": lambda n: ".attn2." not in n and not _edge(n),                 # ESD-u
    "selfattn": lambda n: ".attn1." in n,
    "notime": lambda n: not _edge(n),
    "full": lambda n: True,
}


def trainable_parameters(unet: torch.nn.Module, method: str) -> dict[str, torch.nn.Parameter]:
    """Name -> parameter for the subset `method` trains; the rest are frozen (requires_grad False)."""
    if method not in FINETUNING_METHODS:
        raise KeyError(f"unknown fine-tuning method {method!r}; choose from {', '.join(FINETUNING_METHODS)}")
    pick = FINETUNING_METHODS[method]
    chosen = {n: p for n, p in unet.named_parameters() if pick(n)}
    for n, p in unet.named_parameters():
        p.requires_grad_(n in chosen)
    return chosen


def describe(subset: dict[str, torch.Tensor], unet: torch.nn.Module, method: str) -> str:
    """'trains N of M U-Net parameters (x%) [method]'."""
    n = sum(p.numel() for p in subset.values())
    total = sum(p.numel() for p in unet.parameters())
    return f"trains {n:,} of {total:,} U-Net parameters ({100 * n / total:.2f}%) in {len(subset)} tensors [{method}]"
