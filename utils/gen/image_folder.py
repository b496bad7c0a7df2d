"""An image folder of generate.py: the images to make (jobs, seeds, initial latents), their metadata rows (one shard
file per job, merged into metadata.csv) and the checks that keep one folder to one setting."""
from __future__ import annotations

import csv
import json
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import pandas as pd
import torch

from utils.cli import UserError, same_flag_value
from utils.prompts import Prompt
from utils.saving import atomic_write_text
from utils.seeding import seeded_latents

METADATA = "metadata.csv"
ARGS = "args.json"
BASE_COLUMNS = ["file", "prompt", "seed", "guidance", "guidance_source", "steps", "mode", "config", "unet", "lora"]


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


def make_jobs(prompts: Sequence[Prompt], num_images: int, seed: int, guidance: float,
              file_guidance: bool = True) -> list[Job]:
    """Every image of `prompts`: seed from the file, else seed + index; guidance from the file when it has one and
    `file_guidance` (--guidance_source file), else `guidance`."""
    return [Job(p, j, seed + p.index if p.seed is None else p.seed,
                p.guidance if file_guidance and p.guidance is not None else guidance)
            for p in prompts for j in range(num_images)]


def initial_latents(seed: int, j: int, shape: Sequence[int]) -> torch.Tensor:
    """Image j's starting latent: the (j+1)-th draw of shape (1, *shape) from a CPU generator seeded with `seed`."""
    return seeded_latents(seed, (1, *shape), index=j)


def guidance_batches(jobs: Sequence[Job], batch_size: int) -> list[list[Job]]:
    """Batches of at most batch_size jobs sharing one guidance scale (file order kept within each scale)."""
    groups: dict[float, list[Job]] = {}
    for job in jobs:
        groups.setdefault(job.guidance, []).append(job)
    return [g[i:i + batch_size] for g in groups.values() for i in range(0, len(g), batch_size)]


# ---------------------------------------------------------------------------------------------------- metadata
def metadata_row(job: Job, meta: dict[str, Any]) -> dict[str, Any]:
    """file, prompt, seed, guidance, the run's guidance_source/steps/mode/config/unet, then the file's other columns."""
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


def _frames(image_dir: Path) -> list[pd.DataFrame]:
    """metadata.csv and the shard files that can be read, in _sources' order."""
    return [df for df in map(_read_metadata, _sources(image_dir)) if df is not None]


def known_files(image_dir: Path) -> set[str]:
    """Files that already have a metadata row in metadata.csv or any shard file."""
    return {f for df in _frames(image_dir) for f in df["file"]}


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
        frames = _frames(image_dir)
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


def check_prompts(image_dir: Path, jobs: Iterable[Job], overwrite: bool) -> None:
    """Refuse images in the folder whose metadata row has another prompt, seed or guidance than this run's job for
    that file (the prompt file was edited); --overwrite redoes them."""
    if overwrite:
        return
    rows: dict[str, tuple[str, str, str]] = {}
    for df in _frames(image_dir):
        if {"prompt", "seed", "guidance"} <= set(df.columns):
            rows.update(zip(df["file"], zip(df["prompt"].map(_words), df["seed"], df["guidance"].map(_number))))
    bad = [j.file for j in jobs if j.file in rows and (image_dir / j.file).is_file()
           and rows[j.file] != (_words(j.prompt.text), str(j.seed), _number(j.guidance))]
    if bad:
        raise UserError(f"{image_dir / bad[0]} (and {len(bad) - 1} more) was drawn from another prompt, seed or "
                        f"guidance than the prompt file now gives it; use another --image_dir, or --overwrite to "
                        f"redo them")


def _words(text: str) -> str:
    return " ".join(str(text).split())


def _number(value) -> str:
    try:
        return repr(float(value))
    except (TypeError, ValueError):
        return str(value)


def check_settings(image_dir: Path, settings: dict[str, Any], overwrite: bool, planned: Iterable[str] = ()) -> list[str]:
    """Refuse to mix images of other settings (args.json) into a folder: without overwrite at all, with it when images
    that this run does not redo (not in `planned`) would stay; the settings that differ."""
    path = image_dir / ARGS
    try:
        old = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (json.JSONDecodeError, UnicodeDecodeError):
        old = {}
    diff = [f"{k}: {old[k]!r} there, {v!r} now" for k, v in settings.items()
            if k in old and not same_flag_value(old[k], v)]
    if not diff:
        return []
    known = known_files(image_dir)
    if not known and not any(image_dir.glob("*.png")):
        return []  # nothing made with the old settings (a run that failed before its first image)
    if not overwrite:
        raise UserError(f"{image_dir} holds images made with other settings ({'; '.join(diff)}); "
                        f"use another --image_dir, or --overwrite to redo them")
    stale = sorted(known - set(planned))
    if stale:
        raise UserError(f"{image_dir} holds {len(stale)} images made with other settings ({diff[0]}) that this run "
                        f"would not redo (first: {stale[0]}); remove them or use another --image_dir")
    return diff
