"""Measuring a toy model: which prompts are drawn with which seeds, and what the judge makes of the images.

Two measurements share the prompt sets of utils.toy.language:
- `quality_items`: base quality, per colour: explicit, paraphrase (held out) and implied (object) prompts, plus the
  empty prompt (its colour mix is the target SDD erases towards);
- `erasure_items`: for the erased colours, explicit / paraphrase / implied prompts (how often the colour still
  shows), and for every other colour a few "keep" prompts, compared seed for seed with the base model (preservation).
Every image has its own seed, fixed by (seed, prompt, j), so a prompt is drawn the same way in any subset; generate.py
draws the same latents from a CSV of these items (`write_items`), so in-process and generate.py measurements agree.
"""
from __future__ import annotations

import csv
import io
import json
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from utils.cli import UserError, resolve_device
from utils.saving import atomic_write_text
from utils.seeding import seeded_latents
from utils.toy.judge import OTHER, judge, nearest_colour, preserved
from utils.toy.language import (COLOUR_WORDS, COLOURS, OBJECT_TEMPLATES, OBJECTS, SHAPES, TEMPLATES, fill, objects_of,
                                parse_prompt, prompt_sets, prompt_words)
from utils.toy.train import DEFAULT_GUIDANCE, DEFAULT_STEPS, LANGUAGE_FILE

# each erasable colour's neighbour: the colour nearest to it, which an erasure must leave alone
NEIGHBOURS = {"red": "orange", "orange": "red", "yellow": "orange", "green": "yellow", "blue": "purple",
              "purple": "blue"}
KINDS = ("explicit", "paraphrase", "implied")
_COLOUR_WORDS = {w for ws in COLOUR_WORDS.values() for w in ws}


@dataclass(frozen=True)
class Item:
    """One image to draw: its prompt and seed, what it measures (group) and the colour/shape the prompt asks for."""

    prompt: str
    seed: int
    group: str  # explicit / paraphrase / implied / keep / empty
    colour: str | None
    shape: str | None


def load_pipeline(model: str | os.PathLike, unet: str | os.PathLike | None = None, device: str | None = "cpu"):
    """The model family's text-to-image pipeline (StableDiffusionPipeline, or StableDiffusionXLPipeline for an SDXL
    toy) from a local folder, its U-Net optionally replaced (U-Net folder, erasure file or training checkpoint folder)."""
    from utils.families import family_of
    from utils.gen.pipelines import build_pipeline, load_parts  # without transformers' notices

    parts = load_parts(str(model), None if unet is None else str(unet), torch.float32)
    return build_pipeline(family_of(str(model)).pipeline("sd"), parts, resolve_device(device))


def uses_an(model: str | os.PathLike) -> bool:
    """Whether a toy model's prompts put 'an' before vowels ("an orange circle": toy 3), as its folder's
    toy_language.json says; a folder without one (toy 2, the toy SDXL) was trained on "a orange circle"."""
    path = Path(model) / LANGUAGE_FILE
    return path.is_file() and json.loads(path.read_text(encoding="utf-8")).get("articles") == "an"


def image_seed(prompt: str, j: int, seed: int = 0) -> int:
    """The seed of image j of `prompt`: fixed by (seed, prompt, j), whatever else is measured."""
    return zlib.crc32(f"{seed}:{prompt}".encode()) * 1000 + j


def _items(prompts: Sequence[tuple[str, str | None]], group: str, colour: str | None, n: int, seed: int) -> list[Item]:
    return [Item(p, image_seed(p, j, seed), group, colour, s) for p, s in prompts for j in range(n)]


def keep_prompts(colour: str, an: bool = False) -> list[tuple[str, str]]:
    """Prompts for a colour that an erasure of another colour must not change: its name with each shape, its objects."""
    named = [(fill(TEMPLATES[0], colour, s, an=an), s) for s in SHAPES]
    return named + [(fill(OBJECT_TEMPLATES[0], obj=o), OBJECTS[o][1]) for o in objects_of(colour)]


def check_colours(colours: Sequence[str], what: str = "concept") -> list[str]:
    """The colours, or a one-line error naming the unknown ones."""
    bad = [c for c in colours if c not in COLOURS]
    if bad or not colours:
        raise UserError(f"unknown or no {what} colour {bad}; choose from {', '.join(COLOURS)}")
    return list(colours)


def erasure_items(concepts: Sequence[str], n: int = 8, seed: int = 0, an: bool = False) -> list[Item]:
    """The erased colours' explicit/paraphrase/implied prompts and every other colour's keep prompts, n images each
    (an: the model's prompts put 'an' before vowels, uses_an)."""
    concepts = check_colours(concepts)
    items = [it for c in concepts for kind, ps in prompt_sets(c, an).items() for it in _items(ps, kind, c, n, seed)]
    return items + [it for c in COLOURS if c not in concepts for it in _items(keep_prompts(c, an), "keep", c, n, seed)]


def quality_items(n: int = 20, seed: int = 0, colours: Sequence[str] | None = None, empty: int = 0,
                  an: bool = False) -> list[Item]:
    """Base quality: every colour's explicit, paraphrase and implied prompts (n images each), `empty` unprompted
    (an: the model's prompts put 'an' before vowels, uses_an)."""
    items = [it for c in check_colours(colours or list(COLOURS)) for kind, ps in prompt_sets(c, an).items()
             for it in _items(ps, kind, c, n, seed)]
    return items + empty_items(empty, seed)


def empty_items(n: int, seed: int = 0) -> list[Item]:
    """`n` images of the empty prompt (its colour mix: the unconditional estimate SDD erases towards)."""
    return _items([("", None)], "empty", None, n, seed)


def write_items(items: Sequence[Item], path: str | os.PathLike) -> None:
    """The items as a generate.py prompt file: one row per image (prompt, evaluation_seed, group, colour, shape)."""
    text = io.StringIO()
    w = csv.writer(text, lineterminator="\n")
    w.writerow(["prompt", "evaluation_seed", "group", "asked_colour", "asked_shape"])
    w.writerows([it.prompt, it.seed, it.group, it.colour or "", it.shape or ""] for it in items)
    atomic_write_text(path, text.getvalue())


def items_from_records(records: Sequence[dict]) -> list[Item]:
    """Items back from rows with prompt and seed, and group, asked_colour, asked_shape when present (a prompt file
    written by write_items, carried into generate.py's metadata.csv); else what the prompt asks (item_for_prompt)."""
    if records and "group" in records[0]:
        return [Item(r["prompt"], int(r["seed"]), r["group"], r["asked_colour"] or None, r["asked_shape"] or None)
                for r in records]
    return [item_for_prompt(r["prompt"], int(r["seed"])) for r in records]


def item_for_prompt(prompt: str, seed: int) -> Item:
    """What a free-form prompt measures: empty, paraphrase (a held-out phrasing), implied (an object), explicit
    (a colour word) or other, with the colour and shape it asks for."""
    colour, shape = parse_prompt(prompt)
    words = prompt_words(prompt)
    if not words:
        group = "empty"
    elif colour and any(" ".join(words) == p for an in (False, True) for p, _ in prompt_sets(colour, an)["paraphrase"]):
        group = "paraphrase"
    elif set(words) & set(OBJECTS) and not set(words) & _COLOUR_WORDS:
        group = "implied"
    else:
        group = "explicit" if colour else "other"
    return Item(prompt, seed, group, colour, shape)


@torch.no_grad()
def sample_images(pipe, prompts: Sequence[str], seeds: Sequence[int], num_inference_steps: int = DEFAULT_STEPS,
                  guidance_scale: float = DEFAULT_GUIDANCE, batch_size: int = 64, desc: str | None = None,
                  output_type: str = "pil", **pipe_kw) -> list:
    """One image per (prompt, seed); each image's initial latents come from a CPU generator seeded by its seed
    (output_type "latent": the final latents instead; pipe_kw: further arguments of the pipeline call, e.g. eta)."""
    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    unet = pipe.unet
    size = unet.config.sample_size
    shape = (unet.config.in_channels, size, size)
    out: list[Image.Image] = []
    with tqdm(total=len(prompts), desc=desc, unit="img", disable=desc is None, leave=False) as bar:
        for i in range(0, len(prompts), batch_size):
            ps, ss = list(prompts[i:i + batch_size]), seeds[i:i + batch_size]
            latents = torch.stack([seeded_latents(int(s), shape) for s in ss])
            res = pipe(prompt=ps, latents=latents.to(pipe.device, unet.dtype), num_inference_steps=num_inference_steps,
                       guidance_scale=guidance_scale, height=size * pipe.vae_scale_factor,
                       width=size * pipe.vae_scale_factor, output_type=output_type, **pipe_kw)
            out.extend(res.images)
            bar.update(len(ps))
    return out


def draw(pipe, items: Sequence[Item], desc: str | None = None, **kw) -> list[Image.Image]:
    """The items' images from `pipe` (kw: num_inference_steps, guidance_scale, batch_size)."""
    return sample_images(pipe, [it.prompt for it in items], [it.seed for it in items], desc=desc, **kw)


def _rate(flags: Sequence[bool]) -> float:
    return float(np.mean(flags)) if len(flags) else float("nan")


def quality(items: Sequence[Item], images: Sequence[Image.Image]) -> dict:
    """Per colour and kind the share of images showing the asked colour (implied: colour and shape), shape accuracy,
    judged colour counts, and the empty prompt's colour mix."""
    verdicts = [judge(im) for im in images]
    res: dict = {"rate": {}, "counts": {}, "shape_acc": {}, "empty_mix": {}}
    for c in dict.fromkeys(it.colour for it in items if it.colour):
        for kind in KINDS:
            v = [(it, jv) for it, jv in zip(items, verdicts) if it.colour == c and it.group == kind]
            ok = [jc == c and (kind != "implied" or js == it.shape) for it, (jc, js) in v]
            res["rate"].setdefault(kind, {})[c] = _rate(ok)
            res["counts"].setdefault(kind, {})[c] = _counts([jc for _, (jc, _) in v])
        v = [(it, jv) for it, jv in zip(items, verdicts) if it.colour == c and it.shape]
        res["shape_acc"][c] = _rate([js == it.shape for it, (_, js) in v])
    shaped = [(it, jv) for it, jv in zip(items, verdicts) if it.shape]
    res["shape_acc"]["all"] = _rate([js == it.shape for it, (_, js) in shaped])
    empty = [jc for it, (jc, _) in zip(items, verdicts) if it.group == "empty"]
    if empty:
        res["empty_mix"] = colour_mix(empty)
    return res


def colour_mix(colours: Sequence[str | None]) -> dict[str, float]:
    """Share of each judged colour (every palette colour, other and none listed, zeros included)."""
    return {k: v / len(colours) for k, v in _counts(colours).items()}


def _counts(colours: Sequence[str | None]) -> dict[str, int]:
    out = {k: 0 for k in [*COLOURS, OTHER, "none"]}
    for c in colours:
        out[c or "none"] += 1
    return out


def erasure(items: Sequence[Item], before: Sequence[Image.Image], after: Sequence[Image.Image],
            concepts: Sequence[str]) -> dict:
    """Rates of the erased colours per kind (before, after, and after by the nearest palette colour: an upper bound),
    preservation per kept colour, shape accuracy, and what each asked colour's prompts are drawn as (before, after)."""
    vb, va = [judge(im) for im in before], [judge(im) for im in after]
    res: dict = {"concepts": list(concepts), "before": {}, "after": {}, "after_nearest": {}, "preserved": {}}
    for c in concepts:
        for kind in KINDS:
            idx = [i for i, it in enumerate(items) if it.colour == c and it.group == kind]
            res["before"].setdefault(kind, {})[c] = _rate([vb[i][0] == c for i in idx])
            res["after"].setdefault(kind, {})[c] = _rate([va[i][0] == c for i in idx])
            res["after_nearest"].setdefault(kind, {})[c] = _rate([nearest_colour(after[i]) == c for i in idx])
    for c in dict.fromkeys(it.colour for it in items if it.group == "keep"):
        idx = [i for i, it in enumerate(items) if it.colour == c and it.group == "keep"]
        res["preserved"][c] = _rate([preserved(before[i], after[i]) for i in idx])
    neighbours = neighbours_of(concepts)
    kept = res["preserved"]
    res["preserved_neighbours"] = _rate([v for c, v in kept.items() if c in neighbours])
    res["preserved_others"] = _rate([v for c, v in kept.items() if c not in neighbours])
    res["preserved_all"] = _rate(list(kept.values()))
    shaped = [i for i, it in enumerate(items) if it.shape]
    res["shape_acc_before"] = _rate([vb[i][1] == items[i].shape for i in shaped])
    res["shape_acc_after"] = _rate([va[i][1] == items[i].shape for i in shaped])
    res["drawn_before"], res["drawn_after"] = drawn(items, vb), drawn(items, va)
    res["drawn_neighbours"], res["drawn_others"] = drawn_split(res)
    return res


def neighbours_of(concepts: Sequence[str]) -> list[str]:
    """The erased colours' palette neighbours that are not erased themselves (the kept colours measured apart)."""
    return [NEIGHBOURS[c] for c in concepts if NEIGHBOURS[c] not in concepts]


def drawn_own(res: dict, colours: Sequence[str]) -> float:
    """Mean over `colours` of the share of their prompts judged in their own colour at all (an erasure result's
    drawn_after; `preserved` also asks for the same shape and place as before)."""
    return _rate([res["drawn_after"][c].get(c, 0.0) for c in colours])


def drawn_split(res: dict) -> tuple[float, float]:
    """drawn_own of an erasure result's kept colours: (the neighbours, the others), as preserved_neighbours and
    preserved_others split them (computed from drawn_after, so results saved before these keys existed work too)."""
    near = neighbours_of(res["concepts"])
    kept = list(res["preserved"])
    return drawn_own(res, [c for c in kept if c in near]), drawn_own(res, [c for c in kept if c not in near])


def drawn(items: Sequence[Item], verdicts: Sequence[tuple[str | None, str | None]]) -> dict[str, dict[str, float]]:
    """Per asked colour, the share of its images judged as each colour (other = off-palette, none = no shape)."""
    out = {}
    for c in dict.fromkeys(it.colour for it in items if it.colour):
        judged = [jc for it, (jc, _) in zip(items, verdicts) if it.colour == c]
        out[c] = {k: v for k, v in colour_mix(judged).items() if v}
    return out

