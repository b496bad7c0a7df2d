"""from_pretrained with one-line errors for hub ids and local folders, and casting without copies (any family)."""
from __future__ import annotations

import difflib
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from diffusers.utils import logging as diffusers_logging
from transformers.utils import logging as transformers_logging

from utils.cli import UserError


def _looks_local(name: str) -> bool:
    return os.path.isabs(name) or name.startswith((".", "~")) or os.sep in name.rstrip(os.sep) and name.count("/") != 1


def check_model_source(name: str) -> None:
    """Fail early on a local path that does not exist or is not a pipeline folder."""
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "model_index.json").exists() and not (path / "unet").is_dir():
            raise UserError(f"{name} is not a diffusers pipeline folder (no model_index.json or unet/ inside)")
    elif _looks_local(name):
        raise UserError(f"model folder {name} does not exist")


@contextmanager
def no_loading_bars() -> Iterator[None]:
    """Hide diffusers' and transformers' loading bars ("Loading pipeline components", "Loading weights")."""
    libraries = [lib for lib in (diffusers_logging, transformers_logging) if lib.is_progress_bar_enabled()]
    for lib in libraries:
        lib.disable_progress_bar()
    try:
        yield
    finally:
        for lib in libraries:
            lib.enable_progress_bar()


def _neither(name: str) -> str:
    """The message for a string that is no existing folder and could not be loaded from the hub either."""
    text = (f"{name!r} is neither an existing folder nor a reachable Hugging Face hub id (could not download it: "
            f"offline, private or unknown id)")
    parent = Path(name).expanduser().parent
    if name.count("/") == 1 and parent.is_dir():  # `assets/no-such-model`: most likely a mistyped local path
        folders = sorted(p.name for p in parent.iterdir() if p.is_dir() and not p.name.startswith("."))
        near = difflib.get_close_matches(Path(name).name, folders, n=3) or folders[:5]
        text += f" (folders in {parent}/: {', '.join(near) or 'none'})"
    return text + "; pass a local folder made with save_pretrained, or a hub id"


def from_pretrained(cls, name: str, **kwargs):
    """`cls.from_pretrained` without loading bars, turning hub/network/missing-file failures into a UserError."""
    path = Path(name).expanduser()
    if path.exists():
        name = str(path)
    try:
        with no_loading_bars():
            return cls.from_pretrained(name, **kwargs)
    except (OSError, ValueError) as e:
        if path.exists():
            raise UserError(f"could not load {cls.__name__} from {name}: {str(e).splitlines()[0]}") from None
        raise UserError(_neither(name)) from None


def cast(module: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """Move to device, casting only when the dtype changes (diffusers warns on every dtype cast).

    Both in one pass over the tensors, so a full-precision copy of the model never sits on the device.
    """
    if next(module.parameters()).dtype != dtype:
        return module.to(device=device, dtype=dtype)
    return module.to(device)
