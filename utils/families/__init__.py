"""Model families: which one a checkpoint is, read from its model_index.json (SD 1.x/2.x today)."""
from __future__ import annotations

import json
from pathlib import Path

from utils.families.base import FINETUNING_METHODS, Cond, Family, describe  # noqa: F401
from utils.cli import UserError
from utils.families.sd import SD
from utils.families.sdxl import REFUSED, SDXL

FAMILIES: dict[str, Family] = {f.name: f for f in (SD(), SDXL())}
DEFAULT = "sd"


def family_of(name: str | None) -> Family:
    """The family of a pipeline folder or hub id, from its model_index.json's _class_name (or, for a folder with only
    unet/, the U-Net's config); SD 1.x/2.x when neither can be read. UserError for a checkpoint no family takes."""
    cls = _index_class(name) if name else None
    if cls in REFUSED:
        raise UserError(f"{name} is {REFUSED[cls]} ({cls}); erasure and generation take the text-to-image base model")
    for family in FAMILIES.values():
        if cls in family.pipeline_classes:
            return family
    unet_config = Path(name).expanduser() / "unet" / "config.json" if name else None
    if cls is None and unet_config is not None and unet_config.is_file():
        if json.loads(unet_config.read_text(encoding="utf-8")).get("addition_embed_type") == "text_time":
            return FAMILIES["sdxl"]
    return FAMILIES[DEFAULT]


def _index_class(name: str) -> str | None:
    """_class_name of a local folder's model_index.json, or of a cached / reachable hub id's; None if none."""
    index = Path(name).expanduser() / "model_index.json"
    if index.is_file():
        return json.loads(index.read_text(encoding="utf-8")).get("_class_name")
    if index.parent.exists() or name.count("/") != 1:
        return None
    try:
        from huggingface_hub import hf_hub_download, try_to_load_from_cache
        cached = try_to_load_from_cache(name, "model_index.json")
        with open(cached if isinstance(cached, str) else hf_hub_download(name, "model_index.json"), encoding="utf-8") as f:
            return json.load(f).get("_class_name")
    except Exception:  # offline, private or unknown: the parts' loading says which, in one line
        return None


def family_of_parts(parts) -> Family:
    """The family whose load() made these parts."""
    return next(f for f in FAMILIES.values() if type(parts).__name__ == f.parts_class)


def family_of_pipeline(pipe) -> Family:
    """The family of a diffusers pipeline instance (SD 1.x/2.x for a class no family names)."""
    return next((f for f in FAMILIES.values() if type(pipe).__name__ in f.pipeline_classes), FAMILIES[DEFAULT])
