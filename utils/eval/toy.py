"""The toy-world judge over a folder of toy images (evaluate.py toy): colour rates per kind of prompt, shape
accuracy, the empty prompt's colour mix, and with --base the erasure numbers with same-seed preservation.

A folder made from `python -m utils.toy prompts` CSVs carries each image's group (explicit / paraphrase / implied /
keep / empty) and asked colour and shape; for any other prompt they are read from the prompt (utils.toy.measure).
"""
from __future__ import annotations

import logging
import os
from typing import Sequence

import numpy as np
from tqdm.auto import tqdm

from utils.cli import UserError
from utils.eval.common import guard_outputs, load_image_folder, load_rgb, output_dir, write_csv, write_json

log = logging.getLogger("sdd")

JUDGEMENTS_CSV, SUMMARY_JSON = "toy_judgements.csv", "toy_summary.json"
NONE = "none"


def _mean(flags: Sequence[bool]) -> float:
    return float(np.mean(flags)) if len(flags) else float("nan")


def pooled(items, verdicts, colours: Sequence[str]) -> dict:
    """Per asked colour over all its prompts: the rate it is shown, what is shown instead; overall accuracies."""
    res: dict = {"colour_rate": {}, "colour_counts": {}}
    for c in colours:
        judged = [jc for it, (jc, _) in zip(items, verdicts) if it.colour == c and it.group != "empty"]
        if judged:
            res["colour_rate"][c] = _mean([j == c for j in judged])
            res["colour_counts"][c] = {k: sum((j or NONE) == k for j in judged)
                                       for k in dict.fromkeys([*colours, *(j or NONE for j in judged)])}
    asked = [(it, v) for it, v in zip(items, verdicts) if it.colour and it.group != "empty"]
    res["colour_acc"] = _mean([jc == it.colour for it, (jc, _) in asked])
    res["shape_acc"] = _mean([js == it.shape for it, (_, js) in zip(items, verdicts) if it.shape])
    res["none_rate"] = _mean([jc is None for jc, _ in verdicts])
    res["judged_colours"] = {k: sum((jc or NONE) == k for jc, _ in verdicts)
                             for k in dict.fromkeys([*colours, *(jc or NONE for jc, _ in verdicts)])}
    return res


def evaluate_toy(folder: str | os.PathLike, out_dir: str | os.PathLike | None = None,
                 base: str | os.PathLike | None = None, concepts: Sequence[str] | None = None) -> dict:
    """Judge every toy image against its prompt (and against the same file in `base`); write the CSV and summary."""
    images = load_image_folder(folder)
    if images.prompts is None:
        raise UserError(f"the toy judge needs each image's prompt: {images.root} has no metadata.csv with a "
                        f"`prompt` column (write the folder with generate.py)")
    from utils import toy  # imported here: the toy package is only needed by this metric
    from utils.toy import measure as M

    records = images.carried().to_dict("records")
    items = M.items_from_records([{**r, "seed": r.get("seed", 0) or 0} for r in records])
    if not any(it.colour or it.shape for it in items):
        raise UserError(f"none of the prompts in {images.root} asks for a toy colour ({', '.join(toy.COLOURS)}), "
                        f"object or shape; is this a toy-world folder?")
    pairs = _base_images(images, base) if base else None
    concepts = _concepts(items, concepts) if base else None
    out = output_dir(folder, out_dir)
    targets = [out / JUDGEMENTS_CSV, out / SUMMARY_JSON]
    guard_outputs(targets, images.paths)
    pil = [load_rgb(p) for p in tqdm(images.paths, desc="toy judge", unit="img")]
    verdicts = [toy.judge(im) for im in pil]
    q = M.quality(items, pil)
    summary = dict(metric="toy", folder=str(images.root), images=len(items), rates=q["rate"],
                   counts_by_kind=q["counts"], shape_acc_by_colour=q["shape_acc"], empty_mix=q["empty_mix"],
                   **pooled(items, verdicts, list(toy.COLOURS)))
    table = images.carried().drop(columns=["judged_colour", "judged_shape", "colour_ok", "shape_ok", "preserved"],
                                  errors="ignore")
    table["judged_colour"] = [c or NONE for c, _ in verdicts]
    table["judged_shape"] = [s or NONE for _, s in verdicts]
    table["colour_ok"] = [int(it.colour is not None and it.colour == c) for it, (c, _) in zip(items, verdicts)]
    table["shape_ok"] = [int(it.shape is not None and it.shape == s) for it, (_, s) in zip(items, verdicts)]
    if pairs is not None:
        before = [load_rgb(p) for p in tqdm(pairs, desc="toy judge (base)", unit="img")]
        summary["erasure"] = dict(base=str(base), **M.erasure(items, before, pil, concepts))
        table["preserved"] = [int(toy.preserved(b, a)) for b, a in zip(before, pil)]
    write_csv(targets[0], table)
    write_json(targets[1], summary)
    log.info("toy %s: %d images, colour rates %s, shape accuracy %.3f", images.root, summary["images"],
             {c: round(v, 3) for c, v in summary["colour_rate"].items()}, summary["shape_acc"])
    return summary


def _base_images(images, base) -> list:
    """The base folder's image for every file of `images` (same name = same prompt and seed)."""
    other = load_image_folder(base, "base folder")
    theirs = {p.name: p for p in other.paths}
    missing = [p.name for p in images.paths if p.name not in theirs]
    if missing:
        raise UserError(f"base folder {base} lacks {len(missing)} of the images (first: {missing[0]}); generate it "
                        f"from the same prompt file and seeds")
    mine, base_rows = images.records.set_index("file"), other.records.set_index("file")
    for col in ("prompt", "seed"):  # a file name is only a pair when both folders drew it from the same prompt and seed
        if col in mine and col in base_rows:
            differ = [f for f in mine.index if str(mine.at[f, col]) != str(base_rows.at[f, col])]
            if differ:
                f = differ[0]
                raise UserError(f"{len(differ)} images of {images.root} have another {col} than the same file in the "
                                f"base folder {base} (first: {f}: {mine.at[f, col]!r} vs {base_rows.at[f, col]!r}); "
                                f"generate both from the same prompt file and seeds")
    return [theirs[p.name] for p in images.paths]


def _concepts(items, concepts: Sequence[str] | None) -> list[str]:
    """The erased colours: given, else those the folder measures with explicit/paraphrase/implied prompts."""
    from utils.toy import COLOURS

    found = list(dict.fromkeys(it.colour for it in items if it.group in ("explicit", "paraphrase", "implied")
                               and it.colour)) if any(it.group == "keep" for it in items) else []
    concepts = list(concepts or found)
    bad = [c for c in concepts if c not in COLOURS]
    if not concepts or bad:
        raise UserError(f"--base needs the erased colours: pass --concepts (choose from {', '.join(COLOURS)})"
                        + (f"; unknown: {bad}" if bad else ""))
    return concepts
