"""The toy-world judge over a folder of toy images: how often the asked colour and shape are what the image shows."""
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


def summarize_toy(asked: Sequence[tuple[str | None, str | None]], judged: Sequence[tuple[str | None, str | None]],
                  colours: Sequence[str], shapes: Sequence[str]) -> dict:
    """Rates over (asked, judged) (colour, shape) pairs; keys as in utils.toy.measure, "none" for no clear colour."""
    if len(asked) != len(judged):
        raise ValueError(f"{len(asked)} prompts but {len(judged)} judgements")
    buckets = [*colours, NONE]
    res: dict = dict(images=len(asked), colour_rate={}, colour_images={}, shape_acc_by_colour={}, shape_acc_by_shape={},
                     colour_counts={})
    asked_colours = [c for c in colours if any(a[0] == c for a in asked)]
    for c in asked_colours:
        rows = [(j, a[1]) for a, j in zip(asked, judged) if a[0] == c]
        res["colour_images"][c] = len(rows)
        res["colour_rate"][c] = _mean([jc == c for (jc, _), _ in rows])
        res["shape_acc_by_colour"][c] = _mean([js == s for (_, js), s in rows if s is not None])
        counts = {k: 0 for k in buckets}
        for (jc, _), _ in rows:
            counts[jc or NONE] += 1
        res["colour_counts"][c] = counts
    for s in [s for s in shapes if any(a[1] == s for a in asked)]:
        res["shape_acc_by_shape"][s] = _mean([j[1] == s for a, j in zip(asked, judged) if a[1] == s])
    res["colour_acc"] = _mean([j[0] == a[0] for a, j in zip(asked, judged) if a[0] is not None])
    res["shape_acc"] = _mean([j[1] == a[1] for a, j in zip(asked, judged) if a[1] is not None])
    res["none_rate"] = _mean([j[0] is None for j in judged])
    judged_all = {k: 0 for k in buckets}
    for jc, _ in judged:
        judged_all[jc or NONE] += 1
    res["judged_colours"] = judged_all
    res["judged_shapes"] = {k: sum(1 for _, js in judged if (js or NONE) == k) for k in [*shapes, NONE]}
    return res


def evaluate_toy(folder: str | os.PathLike, out_dir: str | os.PathLike | None = None) -> dict:
    """Judge every toy image against its prompt; write toy_judgements.csv and toy_summary.json."""
    images = load_image_folder(folder)
    if images.prompts is None:
        raise UserError(f"the toy judge needs each image's prompt: {images.root} has no metadata.csv with a "
                        f"`prompt` column (write the folder with generate.py)")
    out = output_dir(folder, out_dir)
    targets = [out / JUDGEMENTS_CSV, out / SUMMARY_JSON]
    guard_outputs(targets, images.paths)
    from utils import toy  # imported here: utils.toy sets HF_HUB_OFFLINE for its own process on import

    asked = [toy.parse_caption(p) for p in images.prompts]
    if not any(c or s for c, s in asked):
        raise UserError(f"none of the prompts in {images.root} names a toy colour ({', '.join(toy.COLOURS)}) or "
                        f"shape ({', '.join(toy.SHAPES)}); is this a toy-world folder?")
    judged = [toy.judge(load_rgb(p)) for p in tqdm(images.paths, desc="toy judge", unit="img")]
    table = images.carried().drop(columns=["asked_colour", "asked_shape", "judged_colour", "judged_shape",
                                           "colour_ok", "shape_ok"], errors="ignore")
    table["asked_colour"] = [c or "" for c, _ in asked]
    table["asked_shape"] = [s or "" for _, s in asked]
    table["judged_colour"] = [c or NONE for c, _ in judged]
    table["judged_shape"] = [s or NONE for _, s in judged]
    table["colour_ok"] = [int(a[0] is not None and a[0] == j[0]) for a, j in zip(asked, judged)]
    table["shape_ok"] = [int(a[1] is not None and a[1] == j[1]) for a, j in zip(asked, judged)]
    summary = dict(metric="toy", folder=str(images.root),
                   **summarize_toy(asked, judged, list(toy.COLOURS), list(toy.SHAPES)))
    write_csv(targets[0], table)
    write_json(targets[1], summary)
    log.info("toy %s: %d images, colour rates %s, shape accuracy %.3f", images.root, summary["images"],
             {c: round(v, 3) for c, v in summary["colour_rate"].items()}, summary["shape_acc"])
    return summary

