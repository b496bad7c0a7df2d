"""generate.py's machinery: parts loaded once, pipelines built from them (its image folder: utils.gen.image_folder)."""
from __future__ import annotations

import inspect
import json
import os
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from diffusers.utils import logging as diffusers_logging
from transformers.utils import logging as transformers_logging

from utils.cli import UserError
from utils.families import FAMILIES, family_of, family_of_pipeline
from utils.lora import apply_loras
from utils.loading import check_model_source, from_pretrained, no_loading_bars
from utils.saving import load_unet_into

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


@contextmanager
def no_decode_latents_notice() -> Iterator[None]:
    """Hide the FutureWarning that SLD's and SEGA's pipelines raise on every call: they decode with diffusers' own
    deprecated decode_latents (nothing the caller can change)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The decode_latents method is deprecated", category=FutureWarning)
        yield


# SD 1.x/2.x's pipelines (SLD and SEGA exist for that family only); other families name theirs in utils/families/
StableDiffusionPipeline, StableDiffusionPipelineSafe, SemanticStableDiffusionPipeline = (
    FAMILIES["sd"].pipeline(m) for m in ("sd", "sld", "sega"))


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
    """The checkpoint's components and settings (its own scheduler; no safety checker) with --unet_path's weights
    applied and the LoRAs applied, and the tokenizer / text encoder replaced by the given folders (the reference code's --tokenizer_path ...)."""
    check_model_source(name)
    family = family_of(name)
    with quiet_diffusers():
        base = from_pretrained(family.pipeline("sd"), name, torch_dtype=dtype, revision=revision, variant=variant,
                               safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    if unet_path:
        load_unet_into(base.unet, unet_path)
    with quiet_diffusers():  # diffusers notes that the LoRAs hold nothing for the text encoder
        apply_loras(base, loras)
    # the pipeline's own settings too (SDXL's force_zeros_for_empty_prompt: how an empty negative prompt is encoded)
    settings = {k: v for k, v in base.config.items() if not k.startswith("_") and k not in base.components}
    parts = {**base.components, **settings, **family.load_text(tokenizer_path, text_encoder_path)}
    if text_encoder_path:
        parts["text_encoder"].to(dtype)
    family.check_text_width(parts, text_encoder_path)
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
    """Add a textual-inversion file's token(s) to `pipe` with diffusers' load_textual_inversion, as its family's
    files load (SDXL: clip_l and clip_g, one call per text encoder); returns them."""
    if not hasattr(pipe, "load_textual_inversion"):
        raise UserError(f"--textual_inversion needs a pipeline that loads embeddings (--pipeline_type sd), "
                        f"not {type(pipe).__name__}")
    if not Path(path).is_file():
        raise UserError(f"--textual_inversion {path} is not a file")
    before, verbosity = set(pipe.tokenizer.get_vocab()), transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()  # its notice on how resized rows start: they are overwritten at once
    try:
        family_of_pipeline(pipe).load_embedding(pipe, str(path))
    except Exception as e:  # diffusers and safetensors raise ValueError, OSError or their own types for bad files
        raise UserError(f"could not load the textual-inversion embedding {path}: {str(e).splitlines()[0]}") from None
    finally:
        transformers_logging.set_verbosity(verbosity)
    return sorted(set(pipe.tokenizer.get_vocab()) - before)
