"""generate.py's machinery: parts loaded once, pipelines built from them, seeded latents, batches, metadata."""
from __future__ import annotations

import csv
import inspect
import json
import os
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import pandas as pd
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionPipelineSafe
from diffusers.utils import logging as diffusers_logging
from transformers.utils import logging as transformers_logging

from utils.cli import UserError
from utils.lora import apply_loras
from utils.models import check_model_source, from_pretrained
from utils.prompts import Prompt
from utils.saving import atomic_write_text, load_unet_into

METADATA = "metadata.csv"
ARGS = "args.json"
BASE_COLUMNS = ["file", "prompt", "seed", "guidance", "mode", "config", "unet", "lora"]


@contextmanager
def quiet_diffusers() -> Iterator[None]:
    """Hide diffusers' notices ("SLD/SEGA are deprecated", ...) and loading bars while loading and building."""
    old = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)  # new name: dtype
            yield
    finally:
        diffusers_logging.set_verbosity(old)
        diffusers_logging.enable_progress_bar()
        transformers_logging.enable_progress_bar()


def default_safety_concept() -> str:
    """SLD's built-in safety concept, read from a StableDiffusionPipelineSafe built without components."""
    names = [n for n in inspect.signature(StableDiffusionPipelineSafe.__init__).parameters if n != "self"]
    with quiet_diffusers():
        empty = StableDiffusionPipelineSafe(**{**dict.fromkeys(names), "requires_safety_checker": False})
    return empty.safety_concept


def call_defaults(pipeline_class: type) -> dict[str, Any]:
    """The defaults of a pipeline's __call__ arguments (e.g. SEGA's edit_warmup_steps)."""
    return {k: p.default for k, p in inspect.signature(pipeline_class.__call__).parameters.items()
            if p.default is not inspect.Parameter.empty}


def load_parts(name: str, unet_path: str | None, dtype: torch.dtype, revision: str | None = None,
               variant: str | None = None, loras: Sequence[tuple[str, float]] = ()) -> dict[str, Any]:
    """The checkpoint's components (its own scheduler; no safety checker), --unet_path's weights and LoRAs applied."""
    check_model_source(name)
    with quiet_diffusers():
        base = from_pretrained(StableDiffusionPipeline, name, torch_dtype=dtype, revision=revision, variant=variant,
                               safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    if unet_path:
        load_unet_into(base.unet, unet_path)
    with quiet_diffusers():  # diffusers notes that the LoRAs hold nothing for the text encoder
        apply_loras(base, loras)
    return base.components


def build_pipeline(pipeline_class: type, parts: dict[str, Any], device: torch.device):
    """An instance of `pipeline_class` sharing the loaded parts (those its constructor takes), on `device`."""
    params = inspect.signature(pipeline_class.__init__).parameters
    kwargs = {k: v for k, v in parts.items() if k in params}
    if "requires_safety_checker" in params:
        kwargs["requires_safety_checker"] = False
    with quiet_diffusers():
        pipe = pipeline_class(**kwargs).to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ------------------------------------------------------------------------------------------------ images to make
@dataclass
class Job:
    """One image to make: image number j of a prompt, with its seed and guidance scale."""

    prompt: Prompt
    j: int
    seed: int
    guidance: float

    @property
    def file(self) -> str:
        """File name inside image_dir."""
        return f"{self.prompt.stem}_{self.j}.png"


def make_jobs(prompts: Sequence[Prompt], num_images: int, seed: int, guidance: float) -> list[Job]:
    """Every image of `prompts`: seed from the file, else seed + index; guidance from the file, else `guidance`."""
    return [Job(p, j, seed + p.index if p.seed is None else p.seed, guidance if p.guidance is None else p.guidance)
            for p in prompts for j in range(num_images)]


def initial_latents(seed: int, j: int, shape: Sequence[int]) -> torch.Tensor:
    """Image j's starting latent: the (j+1)-th draw of shape (1, *shape) from a CPU generator seeded with `seed`."""
    generator = torch.Generator("cpu").manual_seed(seed)
    for _ in range(j + 1):
        latent = torch.randn((1, *shape), generator=generator)
    return latent


def guidance_batches(jobs: Sequence[Job], batch_size: int) -> list[list[Job]]:
    """Batches of at most batch_size jobs sharing one guidance scale (file order kept within each scale)."""
    groups: dict[float, list[Job]] = {}
    for job in jobs:
        groups.setdefault(job.guidance, []).append(job)
    return [g[i:i + batch_size] for g in groups.values() for i in range(0, len(g), batch_size)]


# ---------------------------------------------------------------------------------------------------- metadata
def metadata_row(job: Job, meta: dict[str, Any]) -> dict[str, Any]:
    """file, prompt, seed, guidance, the run's mode/config/unet, then the prompt file's other columns."""
    base = {"file": job.file, "prompt": job.prompt.text, "seed": job.seed, "guidance": job.guidance, **meta}
    return {**base, **{k: v for k, v in job.prompt.extra.items() if k not in base}}


class MetadataShard:
    """Rows appended to IMAGE_DIR/metadata-{first:05d}-{end:05d}.csv as images are written: one file per shard or
    process, so jobs sharing an image_dir never write the same file; merge_metadata joins them into metadata.csv."""

    def __init__(self, image_dir: Path, first: int, end: int, prompts: Sequence[Prompt]):
        self.path = image_dir / f"metadata-{first:05d}-{end:05d}.csv"
        columns = list(BASE_COLUMNS)
        for p in prompts:
            columns += [k for k in p.extra if k not in columns]
        fresh = not self.path.exists() or self.path.stat().st_size == 0
        if not fresh:  # keep the header it has; a row cut off by a killed run gets its own line
            with open(self.path, newline="", encoding="utf-8") as f:
                columns = next(csv.reader(f))
            with open(self.path, "rb") as f:
                f.seek(-1, os.SEEK_END)
                cut = f.read(1) != b"\n"
        self._file = open(self.path, "a", newline="", encoding="utf-8")
        self._writer = csv.DictWriter(self._file, columns, restval="", extrasaction="ignore", lineterminator="\n")
        if fresh:
            self._writer.writeheader()
        elif cut:
            self._file.write("\n")

    def add(self, row: dict[str, Any]) -> None:
        """Append one row and flush it to disk."""
        self._writer.writerow(row)
        self._file.flush()

    def close(self) -> None:
        """Close the file."""
        self._file.close()


def _read_metadata(path: Path) -> pd.DataFrame | None:
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8")
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, OSError):
        return None
    return df if "file" in df.columns else None


def _sources(image_dir: Path) -> list[Path]:
    """metadata.csv first, then the shard files oldest first (so for a file written twice the newest row wins)."""
    parts = sorted(image_dir.glob("metadata-*.csv"), key=lambda p: (p.stat().st_mtime, p.name))
    return [p for p in [image_dir / METADATA, *parts] if p.is_file()]


def known_files(image_dir: Path) -> set[str]:
    """Files that already have a metadata row in metadata.csv or any shard file."""
    frames = [_read_metadata(p) for p in _sources(image_dir)]
    return {f for df in frames if df is not None for f in df["file"]}


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock on `path` where the OS has flock (so two shards finishing together merge one at a time)."""
    try:
        import fcntl
    except ImportError:  # Windows: no lock
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _file_order(name: str) -> tuple:
    stem, _, j = Path(name).stem.rpartition("_")
    return (0, int(stem), int(j), name) if stem.isdigit() and j.isdigit() else (1, 0, 0, name)


def merge_metadata(image_dir: str | os.PathLike) -> int:
    """Rewrite metadata.csv as the union of itself and all shard files: one row per image that exists (newest row
    wins), in prompt order; written only when it changes. Returns the number of rows."""
    image_dir = Path(image_dir)
    with _locked(image_dir / ".metadata.lock"):
        frames = [df for df in map(_read_metadata, _sources(image_dir)) if df is not None]
        if not frames:
            return 0
        df = pd.concat(frames, ignore_index=True).fillna("").drop_duplicates("file", keep="last")
        df = df[[(image_dir / f).is_file() for f in df["file"]]]
        df = df.iloc[sorted(range(len(df)), key=lambda i: _file_order(df["file"].iloc[i]))]
        text = df.to_csv(index=False, lineterminator="\n")
        target = image_dir / METADATA
        if not target.is_file() or target.read_text(encoding="utf-8") != text:
            atomic_write_text(target, text)
    return len(df)


def check_settings(image_dir: Path, settings: dict[str, Any], overwrite: bool) -> None:
    """Refuse to add to a folder whose args.json records other image settings (its images would be mixed in)."""
    path = image_dir / ARGS
    if overwrite or not path.is_file():
        return
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return
    diff = [f"{k}: {old[k]!r} there, {v!r} now" for k, v in settings.items() if k in old and old[k] != v]
    if diff:
        raise UserError(f"{image_dir} holds images made with other settings ({'; '.join(diff)}); "
                        f"use another --image_dir, or --overwrite to redo them")
