"""Concept and prompt lists from the command line, and text encoding done once."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from utils.cli import UserError


def read_word_list(values: Sequence[str] | None, what: str) -> list[str]:
    """Words from the command line, or the lines of one .txt file (blank lines and # comments skipped)."""
    values = [v for v in (values or []) if v.strip()]
    if len(values) == 1 and (values[0].endswith(".txt") or Path(values[0]).is_file()):
        path = Path(values[0])
        if not path.is_file():
            raise UserError(f"{what} file {path} does not exist")
        values = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()]
        values = [v for v in values if v and not v.startswith("#")]
        if not values:
            raise UserError(f"{what} file {path} is empty")
    if not values:
        raise UserError(f"no {what} given")
    return [v.strip() for v in values]


@torch.no_grad()
def encode_text(tokenizer, text_encoder, prompts: Sequence[str], device: torch.device, batch_size: int = 32) -> torch.Tensor:
    """Last hidden states of the CLIP text encoder, padded to the tokenizer's length, as the SD pipelines do."""
    out = []
    for i in range(0, len(prompts), batch_size):
        ids = tokenizer(list(prompts[i:i + batch_size]), padding="max_length", max_length=tokenizer.model_max_length,
                        truncation=True, return_tensors="pt").input_ids
        out.append(text_encoder(ids.to(text_encoder.device))[0].to(device))
    return torch.cat(out)


def encode_once(tokenizer, text_encoder, prompts: Sequence[str], device: torch.device) -> dict[str, torch.Tensor]:
    """Embedding (1, L, D) for each distinct prompt, computed in one pass."""
    unique = list(dict.fromkeys(prompts))
    emb = encode_text(tokenizer, text_encoder, unique, device)
    return {p: emb[i:i + 1] for i, p in enumerate(unique)}
