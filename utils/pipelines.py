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
from typing import Any, Iterable, Iterator, Sequence

import pandas as pd
import torch
from diffusers.utils import logging as diffusers_logging
from transformers import CLIPTextModel, CLIPTokenizer
from transformers.utils import logging as transformers_logging

from utils.cli import UserError, same_flag_value
from utils.lora import apply_loras
from utils.models import check_model_source, from_pretrained, no_loading_bars
from utils.prompts import Prompt
from utils.saving import atomic_write_text, load_unet_into

METADATA = "metadata.csv"
ARGS = "args.json"
BASE_COLUMNS = ["file", "prompt", "seed", "guidance", "guidance_source", "steps", "mode", "config", "unet", "lora"]
SAMPLING_DEFAULTS = "sampling_defaults.json"  # a model folder's recommended sampling settings
OUR_DEFAULTS: dict[str, Any] = {"num_inference_steps": 25, "guidance_scale": 7.5, "height": None, "width": None}


@contextmanager
def quiet_diffusers() -> Iterator[None]:
    """Hide diffusers' notices ("SLD/SEGA are deprecated", ...) and the loading bars while loading and building."""
    old = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        with no_loading_bars(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)  # new name: dtype
            yield
    finally:
        diffusers_logging.set_verbosity(old)


def _import_pipelines() -> tuple[type, type, type]:
    """diffusers' SD, SLD and SEGA pipelines, imported without transformers' notice (transformers 5 without
    torchvision) that the image processors fall back to their PIL versions: we use no image processor."""
    old = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()
    try:
        from diffusers import SemanticStableDiffusionPipeline, StableDiffusionPipeline, StableDiffusionPipelineSafe
    finally:
        transformers_logging.set_verbosity(old)
    return StableDiffusionPipeline, StableDiffusionPipelineSafe, SemanticStableDiffusionPipeline


StableDiffusionPipeline, StableDiffusionPipelineSafe, SemanticStableDiffusionPipeline = _import_pipelines()


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
               variant: str | None = None, tokenizer_path: str | None = None,
               text_encoder_path: str | None = None,
               loras: Sequence[tuple[str, float]] = ()) -> dict[str, Any]:
    """The checkpoint's components (its own scheduler; no safety checker) with --unet_path's weights applied and
    the LoRAs applied, and the tokenizer / text encoder replaced by the given folders (the reference code's --tokenizer_path ...)."""
    check_model_source(name)
    with quiet_diffusers():
        base = from_pretrained(StableDiffusionPipeline, name, torch_dtype=dtype, revision=revision, variant=variant,
                               safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    if unet_path:
        load_unet_into(base.unet, unet_path)
    with quiet_diffusers():  # diffusers notes that the LoRAs hold nothing for the text encoder
        apply_loras(base, loras)
    parts = base.components
    for key, path, cls in (("tokenizer", tokenizer_path, CLIPTokenizer), ("text_encoder", text_encoder_path,
                                                                          CLIPTextModel)):
        if path:
            if not Path(path).expanduser().is_dir():
                raise UserError(f"--{key}_path {path} is not a folder")
            parts[key] = from_pretrained(cls, path)
    if text_encoder_path:
        parts["text_encoder"].to(dtype)
    width, wanted = parts["text_encoder"].config.hidden_size, parts["unet"].config.cross_attention_dim
    if isinstance(wanted, int) and width != wanted:
        raise UserError(f"the text encoder{f' at {text_encoder_path}' if text_encoder_path else ''} gives {width}-wide "
                        f"embeddings, but the U-Net's cross-attention takes {wanted}")
    return parts


# ------------------------------------------------------------------------------------------- settings and names
def read_sampling_defaults(model: str) -> tuple[dict[str, Any], Path | None]:
    """The model folder's sampling_defaults.json ({} and None when there is none); UserError when malformed."""
    path = Path(model).expanduser() / SAMPLING_DEFAULTS
    if not path.is_file():
        return {}, None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"could not read {path}: {e}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} must hold a JSON object")
    unknown = [k for k in data if k not in OUR_DEFAULTS]
    if unknown:
        raise UserError(f"{path}: unknown key {unknown[0]!r} (known: {', '.join(OUR_DEFAULTS)})")
    for key, value in data.items():
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if key == "guidance_scale" and not (number and value >= 0):
            raise UserError(f"{path}: guidance_scale is {value!r}, not a number >= 0")
        if key != "guidance_scale" and not (number and value == int(value) and value >= 1):
            raise UserError(f"{path}: {key} is {value!r}, not a positive integer")
    return {k: (float(v) if k == "guidance_scale" else int(v)) for k, v in data.items()}, path


def resolve_sampling(args, model: str) -> dict[str, Any]:
    """Fill the sampling flags left unset: the model folder's sampling_defaults.json, else OUR_DEFAULTS; returns
    where each value came from (flag, the file's path, or default)."""
    found, path = read_sampling_defaults(model)
    sources = {}
    for key, default in OUR_DEFAULTS.items():
        if getattr(args, key) is not None:
            sources[key] = "flag"
        elif key in found:
            setattr(args, key, found[key])
            sources[key] = str(path)
        else:
            setattr(args, key, default)
            sources[key] = "default"
    return sources


def _tag(text: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "-" for c in text).strip("-.") or "model"


def default_image_dir(prompt_path: str, model: str, unet_path: str | None, pipeline_type: str,
                      pipeline_config: str) -> Path:
    """outputs/<prompt file stem>/<model>_<type>-<config>; <model> is the erased U-Net's run folder (with the step for
    a checkpoint), else the base model's name (outputs/country_body/sdd-nudity_sd-none,
    outputs/country_body/sdd-nudity-checkpoint-300_sd-none, outputs/country_body/stable-diffusion-v1-4_sld-max)."""
    if unet_path:
        path = Path(unet_path.rstrip("/\\"))
        name = path.parent.name if path.name == "unet" or path.suffix == ".safetensors" else path.name
        if path.name.startswith("checkpoint-"):
            name = f"{path.parent.name}-{path.name}"
    else:
        name = Path(model.rstrip("/\\")).name
    return Path("outputs") / _tag(Path(prompt_path).stem) / f"{_tag(name)}_{pipeline_type}-{pipeline_config}"


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


def load_embedding(pipe, path: str | os.PathLike) -> list[str]:
    """Add a textual-inversion file's token(s) to `pipe` with diffusers' load_textual_inversion; returns them."""
    if not hasattr(pipe, "load_textual_inversion"):
        raise UserError(f"--textual_inversion needs a pipeline that loads embeddings (--pipeline_type sd), "
                        f"not {type(pipe).__name__}")
    if not Path(path).is_file():
        raise UserError(f"--textual_inversion {path} is not a file")
    before, verbosity = set(pipe.tokenizer.get_vocab()), transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()  # its notice on how resized rows start: they are overwritten at once
    try:
        pipe.load_textual_inversion(str(path))
    except Exception as e:  # diffusers and safetensors raise ValueError, OSError or their own types for bad files
        raise UserError(f"could not load the textual-inversion embedding {path}: {str(e).splitlines()[0]}") from None
    finally:
        transformers_logging.set_verbosity(verbosity)
    return sorted(set(pipe.tokenizer.get_vocab()) - before)


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


def check_prompts(image_dir: Path, jobs: Iterable[Job], overwrite: bool) -> None:
    """Refuse images in the folder whose metadata row has another prompt or seed than this run's job for that file
    (the prompt file was edited); --overwrite redoes them."""
    if overwrite:
        return
    rows: dict[str, tuple[str, str, str]] = {}
    for df in map(_read_metadata, _sources(image_dir)):
        if df is not None and {"prompt", "seed", "guidance"} <= set(df.columns):
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
    if diff and not known_files(image_dir) and not any(image_dir.glob("*.png")):
        return []  # nothing made with the old settings (a run that failed before its first image)
    if diff and not overwrite:
        raise UserError(f"{image_dir} holds images made with other settings ({'; '.join(diff)}); "
                        f"use another --image_dir, or --overwrite to redo them")
    stale = sorted(known_files(image_dir) - set(planned)) if diff else []
    if stale:
        raise UserError(f"{image_dir} holds {len(stale)} images made with other settings ({diff[0]}) that this run "
                        f"would not redo (first: {stale[0]}); remove them or use another --image_dir")
    return diff
