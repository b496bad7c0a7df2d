"""Model families: which one a checkpoint is, read from its model_index.json (SD 1.x/2.x today)."""
from __future__ import annotations

import json
from pathlib import Path

from utils.families.base import FINETUNING_METHODS, Cond, Family, describe  # noqa: F401
from utils.families.sd import SD

FAMILIES: dict[str, Family] = {f.name: f for f in (SD(),)}
DEFAULT = "sd"


def family_of(name: str | None) -> Family:
    """The family of a pipeline folder (its model_index.json's _class_name); the default for a hub id or a folder
    without one (a hub id that is not SD 1.x/2.x fails when its parts load)."""
    index = Path(name).expanduser() / "model_index.json" if name else None
    if index is not None and index.is_file():
        cls = json.loads(index.read_text(encoding="utf-8")).get("_class_name", "")
        for family in FAMILIES.values():
            if cls in family.pipeline_classes:
                return family
    return FAMILIES[DEFAULT]


def family_of_parts(parts) -> Family:
    """The family whose load() made these parts."""
    return next(f for f in FAMILIES.values() if type(parts).__name__ == f.parts_class)
