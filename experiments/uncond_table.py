"""Does SDD erase on a toy model, and which weights' target makes it drift? Answer: docs/toy3.md#the-uncond-table.

One table per toy model: SDD with the paper's recipe scaled to the toy and with the demo recipe, each with the three
`--uncond_from` choices (which weights compute the target e(z_t, "")), ESD-x-1 beside them, and the preservation term
on the demo recipes. Each row trains with the real trainer once per --seeds value (its --seed), and is measured
against the base model on the same images (utils.toy.measure.erasure with that seed): red explicit / paraphrase /
implied, orange and the other four colours kept (same colour, shape and place as before), the other four drawn in
their colour at all, shapes, and how far the empty prompt's colour mix moved (total variation distance from the base
model's, over --n_empty images; 0 = the same mix, 1 = no colour in common).
Finished trainings and measurements are kept, so a rerun resumes and adds rows or seeds. Writes OUT/table.md and
OUT/table.json.

    python -m experiments.uncond_table --model assets/toy-sd --output_dir outputs/uncond-toy2 --seeds 0 1 2
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Sequence

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

import train_esd  # noqa: E402
import train_sdd  # noqa: E402
from utils.cli import ArgumentParser, HelpFormatter, UserError, add_threads_arg, apply_threads, run  # noqa: E402
from utils.eval.common import write_json  # noqa: E402
from utils.saving import atomic_write_text  # noqa: E402
from utils.toy import measure as M  # noqa: E402
from utils.toy.cli import training_seconds  # noqa: E402
from utils.toy.judge import judge  # noqa: E402
from utils.toy.recipes import argv_of, slug  # noqa: E402

CONCEPT = "red"
# The paper's SDD recipe (1500 steps, batch 1, lr 1e-5, EMA m 0.999, s_g 3) scaled to the toy by one rule: the toy
# model was trained at 10x SD's learning rate (1e-3 against 1e-4), so fine-tuning is too (1e-5 -> 1e-4); steps, batch
# and m stay, so the EMA's horizon 1 / (1 - m) = 1000 steps sits inside the run as in the paper; N = 50 -> 20 DDIM
# steps, as every toy row (the toy is sampled with 20).
PAPER = {"num_train_steps": 1500, "train_batch_size": 1, "learning_rate": 1e-4, "ema_decay": 0.999,
         "guidance_scale": 3.0, "num_ddim_steps": 20}
DEMO = {"num_train_steps": 600, "train_batch_size": 4, "learning_rate": 3e-4, "ema_decay": 0.99,  # run_sdd_toy.sh
        "guidance_scale": 3.0, "num_ddim_steps": 20}
# the best SDD recipe of the toy-3 sweep (docs/toy3.md#the-toy-3-sweep; its step count picked on seed 0):
# the demo recipe at a third of its learning rate
SWEPT3 = {**DEMO, "learning_rate": 1e-4}
ESD_X1 = {"num_train_steps": 200, "train_batch_size": 4, "learning_rate": 1e-4, "negative_guidance": 1.0,  # toy table
          "guidance_scale": 3.0, "num_ddim_steps": 20}
PRESERVE = {"preserve_prompts": str(ROOT / "assets" / "toy_preserve.txt"), "preserve_weight": 1.0}
ROWS: dict[str, tuple[str, dict]] = {
    **{f"SDD paper-scaled, target {u}": ("sdd", {**PAPER, "uncond_from": u}) for u in ("student", "teacher", "original")},
    **{f"SDD demo, target {u}": ("sdd", {**DEMO, "uncond_from": u}) for u in ("student", "teacher", "original")},
    **{f"SDD toy-3 swept, target {u}": ("sdd", {**SWEPT3, "uncond_from": u}) for u in ("student", "teacher", "original")},
    "ESD-x-1": ("esd", ESD_X1),
    "SDD demo, target student, preserve 1": ("sdd", {**DEMO, "uncond_from": "student", **PRESERVE}),
    "ESD-x-1, preserve 1": ("esd", {**ESD_X1, **PRESERVE}),
}
TRAINERS = {"sdd": train_sdd, "esd": train_esd}


def row_flags(name: str, steps_scale: float) -> tuple[str, dict]:
    """A row's trainer and flags, its steps (and SDD's EMA horizon with them) times --steps_scale."""
    trainer, flags = ROWS[name]
    flags = dict(flags)
    if steps_scale != 1:
        flags["num_train_steps"] = max(1, round(flags["num_train_steps"] * steps_scale))
        if "ema_decay" in flags:
            flags["ema_decay"] = max(0.0, round(1 - (1 - flags["ema_decay"]) / steps_scale, 6))
    return trainer, flags


def train_row(args: argparse.Namespace, name: str, seed: int, out: Path) -> Path:
    """Train one row with one seed into OUT (resumed from its newest checkpoint; kept when finished)."""
    if (out / "unet").is_dir():
        return out / "unet"
    trainer, flags = row_flags(name, args.steps_scale)
    argv = ["--pretrained_model_name_or_path", str(args.model), "--removing_concepts", CONCEPT, "--seed", str(seed),
            "--output_dir", str(out), "--checkpointing_steps", "100", "--resume_from_checkpoint", "latest",
            "--threads", str(args.threads), *argv_of(flags)]
    mod = TRAINERS[trainer]
    return mod.main(mod.parse_args(argv)) / "unet"


def base_images(args: argparse.Namespace, items: list, seed: int) -> list:
    """The base model's images of `items` (cached as OUT/base-seed{seed}.npz, keyed by the model folder)."""
    from PIL import Image

    path = args.output_dir / f"base-seed{seed}.npz"
    if path.is_file():
        data = np.load(path)
        if str(data["model"]) == str(Path(args.model).resolve()) and len(data["images"]) == len(items):
            return [Image.fromarray(a) for a in data["images"]]
    images = M.draw(M.load_pipeline(args.model), items, desc=f"base model, seed {seed}")
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, images=np.stack([np.asarray(im) for im in images]), model=str(Path(args.model).resolve()))
    os.replace(tmp, path)
    return images


def measure_row(args: argparse.Namespace, unet: Path, seed: int) -> dict:
    """Erasure numbers of one result against the base model, and the empty prompt's move (written beside it)."""
    path = unet.parent / f"measure-n{args.n_per_prompt}-e{args.n_empty}.json"
    if path.is_file():
        return json.loads(path.read_text())
    items = (M.erasure_items([CONCEPT], n=args.n_per_prompt, seed=seed, an=M.uses_an(args.model))
             + M.empty_items(args.n_empty, seed=seed))
    before = base_images(args, items, seed)
    after = M.draw(M.load_pipeline(args.model, unet), items, desc=f"{unet.parent.parent.name}, seed {seed}")
    res = M.erasure(items, before, after, [CONCEPT])
    empty = [i for i, it in enumerate(items) if it.group == "empty"]
    mix_b = M.colour_mix([judge(before[i])[0] for i in empty])
    mix_a = M.colour_mix([judge(after[i])[0] for i in empty])
    res.update(empty_before=mix_b, empty_after=mix_a, empty_moved=0.5 * sum(abs(mix_a[k] - mix_b[k]) for k in mix_b),
               training_s=training_seconds(unet))
    write_json(path, res)
    return res


def summary(name: str, results: Sequence[dict]) -> dict:
    """A row's numbers (%), the mean over its seeds with the range when there are several."""
    def stat(values: Sequence[float], scale: float = 100.0) -> str:
        v = np.array(values, dtype=float) * scale
        return f"{v.mean():.1f}" if len(v) == 1 else f"{v.mean():.1f} ({v.min():.1f}-{v.max():.1f})"

    after = [r["after"] for r in results]
    return {"row": name, "seeds": len(results),
            **{f"{CONCEPT} {k}": stat([a[k][CONCEPT] for a in after]) for k in M.KINDS},
            "orange kept": stat([r["preserved_neighbours"] for r in results]),
            "other four kept": stat([r["preserved_others"] for r in results]),
            "other four drawn": stat([M.drawn_split(r)[1] for r in results]),  # the colour alone, not its place
            "shapes": stat([r["shape_acc_after"] for r in results]),
            "empty mix moved": stat([r["empty_moved"] for r in results]),
            "training s": stat([r["training_s"] or float("nan") for r in results], 1.0)}


def markdown(rows: Sequence[dict], header: str) -> str:
    """The table as markdown."""
    cols = list(rows[0])
    lines = [header, "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Flags of the experiment."""
    p = ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--model", type=Path, default=ROOT / "assets" / "toy-sd", help="the toy pipeline folder")
    p.add_argument("--output_dir", type=Path, required=True, help="runs, measurements, table.md and table.json")
    p.add_argument("--rows", nargs="+", choices=list(ROWS), default=list(ROWS), metavar="ROW",
                   help="rows to run, of: " + "; ".join(ROWS))
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="training and image seeds (one run each)")
    p.add_argument("--n_per_prompt", type=int, default=8, help="images per prompt (the demos' 8)")
    p.add_argument("--n_empty", type=int, default=120, help="images of the empty prompt per seed")
    p.add_argument("--steps_scale", type=float, default=1.0, help="scale every row's steps (a smoke test: 0.01)")
    add_threads_arg(p)
    args = p.parse_args(argv)
    if args.n_per_prompt < 1 or args.n_empty < 1 or args.steps_scale <= 0:
        p.error("--n_per_prompt and --n_empty must be >= 1 and --steps_scale > 0")
    return args


def main(args: argparse.Namespace) -> list[dict]:
    """Train and measure every (row, seed); print and write the table."""
    if not (args.model / "model_index.json").is_file():
        raise UserError(f"--model {args.model} is not a pipeline folder (no model_index.json)")
    args.threads = apply_threads(args.threads, torch.device("cpu"))
    args.output_dir.mkdir(parents=True, exist_ok=True)
    rows, raw = [], {}
    for name in args.rows:
        results = []
        for seed in args.seeds:
            unet = train_row(args, name, seed, args.output_dir / slug(name) / f"seed-{seed}")
            results.append(measure_row(args, unet, seed))
        raw[name] = results
        rows.append(summary(name, results))
        print(markdown(rows[-1:], f"{name}: done"), flush=True)
    header = (f"{args.model}, seeds {' '.join(map(str, args.seeds))}, {args.n_per_prompt} images per prompt, "
              f"{args.n_empty} of the empty prompt; % (mean, and range over seeds)")
    text = markdown(rows, header)
    atomic_write_text(args.output_dir / "table.md", text)
    write_json(args.output_dir / "table.json", {"rows": rows, "raw": raw, "flags": {n: row_flags(n, args.steps_scale)
                                                                                      for n in args.rows}})
    print(text)
    return rows


if __name__ == "__main__":
    run(main, parse_args)
