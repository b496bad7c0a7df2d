"""Prompt files (.txt, .csv, .json) read into Prompt records, and prompts cut to the tokenizer's length.

Formats:
- `.txt`: one prompt a line; blank lines are skipped.
- `.csv`: column `prompt` required (an empty cell is the empty prompt); optional `evaluation_seed`, `seed` or
  `sd_seed` (the Hugging Face copy of I2P), `evaluation_guidance`, `guidance_scale` or `sd_guidance_scale`,
  `case_number`; every other column is carried along (I2P's
  `categories`, `hard`, ...; unnamed index columns are dropped). Cells are read as text, so nothing is turned
  into NaN or a float on the way.
- `.json`: a list of strings, a list of objects (fields as the CSV columns) or an object of equally long lists
  (also the reference code's `prompts` with `seeds` or `evaluation_seeds`).
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import pandas as pd

from utils.cli import UserError

SEED_KEYS = ("evaluation_seed", "seed", "sd_seed")  # the first one present is used
GUIDANCE_KEYS = ("evaluation_guidance", "guidance_scale", "sd_guidance_scale")
PLURAL_KEYS = {"prompts": "prompt", "seeds": "seed", "evaluation_seeds": "evaluation_seed"}  # reference JSON object
SEED_RANGE = (-(2 ** 63), 2 ** 64 - 1)  # what torch.Generator.manual_seed accepts


@dataclass
class Prompt:
    """One prompt: its index in the file, text, optional seed, guidance and case number, and the carried columns."""

    index: int
    text: str
    seed: int | None = None
    guidance: float | None = None
    case_number: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def stem(self) -> str:
        """File-name stem of its images: the case number, else the index, as 5 digits."""
        return f"{self.index if self.case_number is None else self.case_number:05d}"


def _missing(value: Any) -> bool:
    if isinstance(value, str):
        return not value.strip()
    return value is None or (isinstance(value, float) and math.isnan(value))


def _number(value: Any, kind: type, what: str) -> int | float:
    """Parse an int or float cell ("4261553411", "7", 7.0); UserError naming `what` otherwise."""
    try:
        if kind is int:
            if isinstance(value, str):
                try:
                    return int(value.strip())
                except ValueError:
                    value = float(value)
            if float(value).is_integer():
                return int(value)
            raise ValueError
        out = float(value)
        if not math.isfinite(out):
            raise ValueError
        return out
    except (TypeError, ValueError):
        raise UserError(f"{what} is {value!r}, not {'an integer' if kind is int else 'a number'}") from None


def _first(record: Mapping[str, Any], keys: tuple[str, ...]) -> Any:
    return next((record[k] for k in keys if k in record and not _missing(record[k])), None)


def _to_prompt(index: int, record: Mapping[str, Any], where: str) -> Prompt:
    text = record.get("prompt")
    text = "" if _missing(text) else str(text)
    seed = _first(record, SEED_KEYS)
    seed = None if seed is None else _number(seed, int, f"{where}: the seed of prompt {index}")
    if seed is not None and not SEED_RANGE[0] <= seed <= SEED_RANGE[1]:
        raise UserError(f"{where}: the seed of prompt {index} ({seed}) is out of the 64-bit range")
    guidance = _first(record, GUIDANCE_KEYS)
    guidance = None if guidance is None else _number(guidance, float, f"{where}: the guidance of prompt {index}")
    case = record.get("case_number")
    case = None if _missing(case) else _number(case, int, f"{where}: the case_number of prompt {index}")
    if case is not None and case < 0:
        raise UserError(f"{where}: the case_number of prompt {index} is negative ({case})")
    extra = {k: ("" if _missing(v) else v if isinstance(v, (str, int, float, bool)) else json.dumps(v))
             for k, v in record.items() if k not in ("prompt", *SEED_KEYS, *GUIDANCE_KEYS)}
    return Prompt(index, text, seed, guidance, case, extra)


def _read_csv(path: Path) -> list[dict[str, Any]]:
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8-sig")
    except pd.errors.EmptyDataError:
        return []
    except (pd.errors.ParserError, UnicodeDecodeError) as e:
        raise UserError(f"could not read {path} as CSV: {str(e).splitlines()[0]}") from None
    df.columns = [str(c).strip() for c in df.columns]
    df = df.drop(columns=[c for c in df.columns if c.startswith("Unnamed:") or not c])
    if "prompt" not in df.columns:
        raise UserError(f"{path} has no `prompt` column (columns: {', '.join(df.columns) or 'none'})")
    return df.to_dict("records")


def _read_json(path: Path) -> list[dict[str, Any]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"could not read {path} as JSON: {e}") from None
    if isinstance(data, dict):
        data = {k if PLURAL_KEYS.get(k, k) in data else PLURAL_KEYS.get(k, k): v for k, v in data.items()}
        if "prompt" not in data or not all(isinstance(v, list) for v in data.values()):
            raise UserError(f"{path}: a JSON object must map `prompt` (or `prompts`) and any other field to lists")
        if len({len(v) for v in data.values()}) > 1:
            raise UserError(f"{path}: the lists in the JSON object have different lengths")
        return [dict(zip(data, row)) for row in zip(*data.values())]
    if not isinstance(data, list):
        raise UserError(f"{path}: expected a JSON list of prompts or an object of lists")
    if all(isinstance(x, str) for x in data):
        return [{"prompt": x} for x in data]
    if all(isinstance(x, dict) and "prompt" in x for x in data):
        return data
    raise UserError(f"{path}: every item of the JSON list must be a string or an object with a `prompt` field")


def read_prompts(path: str | os.PathLike) -> list[Prompt]:
    """Read a .txt, .csv or .json prompt file; UserError if missing, empty, malformed or with repeated case numbers."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"prompt file {path} {'is not a file' if path.exists() else 'does not exist'}")
    suffix = path.suffix.lower()
    if suffix == ".txt":
        try:
            lines = path.read_text(encoding="utf-8-sig").splitlines()
        except UnicodeDecodeError as e:
            raise UserError(f"could not read {path} as UTF-8 text: {e}") from None
        records = [{"prompt": line.strip()} for line in lines if line.strip()]
    elif suffix == ".csv":
        records = _read_csv(path)
    elif suffix == ".json":
        records = _read_json(path)
    else:
        raise UserError(f"prompt file {path} must end in .txt, .csv or .json")
    if not records:
        raise UserError(f"prompt file {path} holds no prompts")
    prompts = [_to_prompt(i, r, str(path)) for i, r in enumerate(records)]
    stems: dict[str, int] = {}
    for p in prompts:
        if p.stem in stems:
            raise UserError(f"{path}: prompts {stems[p.stem]} and {p.index} share case_number {p.case_number}, "
                            f"so their images would overwrite each other")
        stems[p.stem] = p.index
    return prompts


def fit_to_tokenizer(tokenizer, text: str) -> tuple[str, bool]:
    """Cut `text` to the tokenizer's limit at a token boundary, keeping the first tokens as diffusers' truncation does.

    Returns the text and whether it was cut. Every pipeline then sees a prompt that fits, so none warns or fails on
    it (SEGA's own truncation drops the end token and cannot batch prompts of different lengths).
    """
    limit = tokenizer.model_max_length
    ids = tokenizer(text, truncation=False, verbose=False).input_ids  # with start and end tokens
    if len(ids) <= limit:
        return text, False
    keep = limit - 2
    while keep > 0:  # re-tokenizing a cut inside a word can give one more token: then cut one token earlier
        cut = tokenizer.decode(ids[1:1 + keep], skip_special_tokens=True)
        if len(tokenizer(cut, truncation=False, verbose=False).input_ids) <= limit:
            return cut, True
        keep -= 1
    return "", True
