"""The SDD paper's nudity table in miniature: erase "red" from the toy model with every method, measure all alike.

Rows (METHODS): generate.py modes on the base model (--safety_concept red) and train_esd.py / train_sdd.py (red; red
and blue at once). Every row draws the same prompts and seeds through generate.py, is scored by `evaluate.py toy`
against SD's images of the same seeds and, when fine-tuned, attacked with attack.py. Steps whose output exists are
skipped, so a rerun resumes. See docs/toy_table.md.

    bash run_toy_table.sh OUT --model TOY_V2_PIPELINE   # every method: OUT/table.md, table.csv, table.png, samples.png
    bash run_toy_table.sh OUT --quick                     # 5 methods, 2 images per prompt, 1/10 of the training
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Sequence

import attack
import evaluate
import generate
import train_esd
import train_sdd
from utils.toy.recipes import (CONCEPT, METHODS, MULTI, NEIGHBOUR, QUICK, QUICK_N, QUICK_STEPS,
                               argv_of, attack_flags, recipe, settings_table, slug)
from utils.cli import HelpFormatter, Stopped, UserError, log_kept, run, setup_logging
from utils.eval.common import (bar_chart, load_image_folder, load_rgb, write_csv, write_json, write_png,
                               write_text)
from utils.images import image_grid
from utils.toy import measure
from utils.toy.cli import training_seconds
from utils.toy.language import vocabulary

ROOT = Path(__file__).resolve().parents[2]
TRAINERS = {"esd": train_esd, "sdd": train_sdd}
KINDS, log = measure.KINDS, logging.getLogger("sdd")


def check_model(model: Path) -> str:
    """A fingerprint of the model (its U-Net weights); UserError when it is not a toy world 2 pipeline."""
    from transformers import CLIPTokenizer

    if not (model / "model_index.json").is_file():
        raise UserError(f"--model {model} is not a diffusers pipeline folder (no model_index.json)")
    vocab = CLIPTokenizer.from_pretrained(str(model / "tokenizer")).get_vocab()
    missing = [w for w in vocabulary() if w + "</w>" not in vocab]
    if missing:
        raise UserError(f"--model {model} lacks words of the toy world 2 language ({', '.join(missing[:5])}, ...): "
                        f"it is an older toy model; train one with `python -m utils.toy train`")
    weights = sorted((model / "unet").glob("*.safetensors"))
    return hashlib.sha256(b"".join(p.read_bytes() for p in weights)).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------- the steps
def prompt_file(args: argparse.Namespace, concepts: Sequence[str]) -> Path:
    """OUT/prompts/<concepts>-n<N>-seed<S>.csv: the erasure prompts with one seed per image (written once; named by
    its settings, so that a rerun with other ones cannot reuse it: generate.py then refuses the older images)."""
    path = Path(args.output_dir) / "prompts" / f"{'+'.join(concepts)}-n{args.n_per_prompt}-seed{args.seed}.csv"
    if not path.exists():
        measure.write_items(measure.erasure_items(concepts, args.n_per_prompt, args.seed), path)
    return path


def draw(args: argparse.Namespace, folder: Path, prompts: Path, flags: dict, unet: Path | None = None) -> Path:
    """generate.py into `folder` (it skips images already there)."""
    argv = ["--prompt_path", str(prompts), "--image_dir", str(folder), "--pretrained_model_name_or_path",
            str(args.model), "--safety_concept", CONCEPT, "--batch_size", str(args.batch_size), "--device", args.device]
    generate.main(generate.parse_args(argv + argv_of(flags) + (["--unet_path", str(unet)] if unet else [])))
    return folder


def base_folder(args: argparse.Namespace, concepts: Sequence[str]) -> Path:
    """SD's images of the concepts' prompt file: the reference every row is compared with, seed for seed."""
    folder = Path(args.output_dir) / "images" / ("sd" if list(concepts) == [CONCEPT] else "sd-" + "-".join(concepts))
    drawn = vars(args).setdefault("drawn_bases", set())  # once per invocation; generate.py skips finished images
    if folder not in drawn:
        drawn.add(draw(args, folder, prompt_file(args, concepts), {}))
    return folder


def train(args: argparse.Namespace, name: str, r: dict) -> Path:
    """The row's trainer into OUT/train/<method> (skipped when its unet/ exists; resumes from its checkpoints)."""
    out = Path(args.output_dir) / "train" / slug(name)
    if not (out / "unet").is_dir():
        mod = TRAINERS[r["runner"]]
        argv = ["--pretrained_model_name_or_path", str(args.model), "--removing_concepts", *r["concepts"],
                "--output_dir", str(out), "--seed", str(args.seed), "--checkpointing_steps", "100",
                "--resume_from_checkpoint", "latest", "--device", args.device]
        mod.main(mod.parse_args(argv + argv_of(r["flags"])))
    return out / "unet"


def run_attack(args: argparse.Namespace, name: str, unet: Path) -> dict:
    """attack.py on the erased U-Net (skipped when its summary exists): the red rate before and after the attack."""
    out = Path(args.output_dir) / "attack" / slug(name)
    summary = out / attack.SUMMARY
    if not summary.exists():
        flags = {k: str(ROOT / v) if k in ("target_prompt", "prompts") else v
                 for k, v in attack_flags(args.quick).items()}
        argv = ["--pretrained_model_name_or_path", str(args.model), "--unet_path", str(unet), "--concept", CONCEPT,
                "--metric", "toy", "--seed", str(args.seed), "--output_dir", str(out), "--device", args.device,
                "--resume_from_checkpoint", "latest"]
        attack.main(attack.parse_args(argv + argv_of(flags)))
    s = json.loads(summary.read_text())
    return {"pre": s["pre_attack_rate"], "post": s["post_attack_rate"], "images": s["post_attack"]["images"]}


def run_row(args: argparse.Namespace, name: str, settings: dict) -> dict:
    """One method from start to result: train (fine-tuned rows), draw, score against SD, attack; cached in results/."""
    r = recipe(name, args.quick)
    done = Path(args.output_dir) / "results" / f"{slug(name)}.json"
    if done.exists():
        row = json.loads(done.read_text())
        if row["recipe"] != r or row["settings"] != settings:
            raise UserError(f"{done} was made with other settings or another model; delete it (and "
                            f"{Path(args.output_dir) / '*' / slug(name)}) to redo {name}, or use another output folder")
        return row
    t0 = time.time()
    print(f"== {name}", flush=True)
    with log_kept():  # the trainers, generate.py, evaluate.py and attack.py point the log at their own folders
        base = base_folder(args, r["concepts"])
        unet = train(args, name, r) if r["runner"] != "generate" else None
        folder = base if name == "SD" else draw(args, Path(args.output_dir) / "images" / slug(name),
                                                prompt_file(args, r["concepts"]), r["flags"] if unet is None else {}, unet)
        s = evaluate.main(evaluate.parse_args(["toy", str(folder), "--base", str(base), "--concepts", *r["concepts"]]))
        attack = run_attack(args, name, unet) if unet else None
    row = {"name": name, "recipe": r, "settings": settings, "erasure": s["erasure"], "folder": str(folder),
           "training_seconds": training_seconds(unet) if unet else None, "attack": attack,
           "seconds": round(time.time() - t0, 1)}
    write_json(done, row)
    log.info("%s done in %.0f s", name, row["seconds"])
    return row


# ---------------------------------------------------------------------------------------------- the table
def _pct(v: float | None) -> float | None:
    return None if v is None or v != v else round(100 * v, 1)


def columns(row: dict) -> dict:
    """A row's numbers (%, s): red rates, kept colours preserved and drawn, shapes, training time, attack."""
    e, att = row["erasure"], row["attack"] or {}
    drawn = json.loads((Path(row["folder"]) / "toy_summary.json").read_text())["colour_rate"]
    others = [c for c in e["preserved"] if c != NEIGHBOUR]  # kept colours: neither erased nor orange
    mean = lambda d: sum(d[c] for c in others) / len(others)
    return {"method": row["name"], **{f"{k} red %": _pct(e["after"][k][CONCEPT]) for k in KINDS},
            f"{NEIGHBOUR} preserved %": _pct(e["preserved"][NEIGHBOUR]),
            "others preserved %": _pct(mean(e["preserved"])),
            f"{NEIGHBOUR} drawn %": _pct(drawn[NEIGHBOUR]), "others drawn %": _pct(mean(drawn)),
            "shape accuracy %": _pct(e["shape_acc_after"]),
            "training s": None if row["training_seconds"] is None else round(row["training_seconds"]),
            "before attack red %": _pct(att.get("pre")), "after attack red %": _pct(att.get("post"))}


def multi_columns(rows: Sequence[dict]) -> list[dict]:
    """The red+blue rows (and SD on their prompts): every erased colour's rates per kind, purple preserved."""
    multi = [r for r in rows if r["recipe"]["concepts"] == list(MULTI)]
    if not multi:
        return []
    out = [{"method": f"SD ({'+'.join(MULTI)} prompts)",
            **{f"{c} {k} %": _pct(multi[0]["erasure"]["before"][k][c]) for c in MULTI for k in KINDS}}]
    for r in multi:
        e = r["erasure"]
        out.append({"method": r["name"], **{f"{c} {k} %": _pct(e["after"][k][c]) for c in MULTI for k in KINDS},
                    **{f"{c} preserved %": _pct(v) for c, v in e["preserved"].items()}})
    return out


def markdown(table: Sequence[dict]) -> str:
    """A Markdown table of dicts (missing or None: '-')."""
    keys = list(dict.fromkeys(k for row in table for k in row))
    cell = lambda v: "-" if v is None or v != v else str(v)
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" + "---:|" * (len(keys) - 1)]
    return "\n".join(lines + ["| " + " | ".join(cell(row.get(k)) for k in keys) + " |" for row in table]) + "\n"


def samples_picture(rows: Sequence[dict]):
    """A row per method, same prompts and seeds: each explicit shape, a paraphrase, each implied shape, kept colour."""
    import pandas as pd
    from PIL import Image

    sd = load_image_folder(next(r["folder"] for r in rows if r["name"] == "SD")).records
    by = lambda g: sd[sd["group"] == g]
    picks = pd.concat([by("explicit").drop_duplicates("asked_shape"), by("paraphrase").head(1),
                       by("implied").drop_duplicates("asked_shape"), by("keep").drop_duplicates("asked_colour")])
    pictures = []
    for r in rows:
        rec = load_image_folder(r["folder"]).records.set_index(["prompt", "seed"])
        images = [load_rgb(rec.loc[(p, s), "_path"]) for p, s in zip(picks["prompt"], picks["seed"])]
        pictures.append([im.resize((2 * im.width, 2 * im.height), Image.NEAREST) for im in images])
    return image_grid(pictures, [r["name"] for r in rows], label_width=130), list(picks["prompt"])


QUICK_NOTE = ("**A plumbing check, not an erasure.** `--quick` runs every step of the table (training, drawing, "
              "scoring, the attack) with {frac} of each recipe's steps and {n} image(s) per prompt, to show that the "
              "pieces fit; its fine-tuned rows are not trained long enough to erase {concept}, so their rates say "
              "nothing about the methods (the full table: `bash run_toy_table.sh OUT`, docs/toy_table.md).")


def heading(args: argparse.Namespace, settings: dict) -> str:
    """The table's title and the line that says how it was made (with --quick: that it is a plumbing check)."""
    title = (f"# Plumbing check (--quick) of the toy table: every method's steps run, \"{CONCEPT}\" is not meant "
             f"to be erased\n\n" + QUICK_NOTE.format(frac=f"1/{round(1 / QUICK_STEPS)}", n=args.n_per_prompt,
                                                      concept=CONCEPT) + "\n\n"
             if args.quick else f"# Erasing \"{CONCEPT}\" from the toy model, every method\n\n")
    return (title + f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, `{command(args)}` (U-Net sha256 "
            f"{settings['model_sha256']}): {args.n_per_prompt} image(s) per prompt, seed {args.seed}, the model's "
            f"sampling defaults. Rates in % of images; preservation: same prompt and seed as SD, same colour and "
            f"shape, overlapping (docs/toy_table.md).\n\n")


def quick_label(cols: dict, row: dict) -> dict:
    """A --quick row as printed: a fine-tuned method's name says that its few steps are a plumbing check."""
    steps = row["recipe"]["flags"].get("num_train_steps")
    if row["recipe"]["runner"] == "generate" or steps is None:
        return cols
    return {**cols, "method": f"{cols['method']} (quick: {steps} steps, plumbing only)"}


def write_outputs(args: argparse.Namespace, rows: Sequence[dict], settings: dict) -> str:
    """table.md, table.csv, table.png and samples.png; returns the Markdown."""
    import pandas as pd

    out = Path(args.output_dir)
    table, multi = [columns(r) for r in rows], multi_columns(rows)
    picture, prompts = samples_picture(rows)
    write_png(out / "samples.png", picture)
    series = {k: [t[f"{k} red %"] for t in table] for k in KINDS} | {
        "after attack": [float("nan") if t["after attack red %"] is None else t["after attack red %"] for t in table]}
    write_png(out / "table.png", bar_chart([t["method"] for t in table], series,
                                           f"{CONCEPT} erased from the toy model: images still {CONCEPT}"
                                           + (" (--quick: a plumbing check)" if args.quick else ""), "%"))
    extra = {m["method"]: m for m in multi}  # the red+blue rows' blue columns join their main rows
    csv_rows = [{**t, **extra.pop(t["method"], {})} for t in table] + list(extra.values())
    write_csv(out / "table.csv", pd.DataFrame(csv_rows))
    tuned = settings_table([r["name"] for r in rows], args.quick)
    md = (heading(args, settings)
          + markdown([quick_label(t, r) for t, r in zip(table, rows)] if args.quick else table)
          + (f"\nRed and blue erased at once (SD: the same prompts and seeds on the base model):\n\n{markdown(multi)}"
             if multi else "")
          + (f"\nFine-tuning settings:\n\n{markdown(tuned)}\nAttack (attack.py, concept inversion on each erased "
             f"U-Net): " + ", ".join(f"{k} {v}" for k, v in attack_flags(args.quick).items()) + ".\n" if tuned else "")
          + f"\nsamples.png, one column each: {'; '.join(prompts)}.\n")
    write_text(out / "table.md", md)
    return md


def command(args: argparse.Namespace) -> str:
    """The command line that makes this table."""
    default = ["SD", *[m for m in (QUICK if args.quick else METHODS) if m != "SD"]]
    methods = "" if args.methods == default else \
        " --methods " + " ".join(slug(m) for m in args.methods if m != "SD")
    return (f"bash run_toy_table.sh {args.output_dir}{' --quick' if args.quick else ''} --model {args.model} "
            f"--n_per_prompt {args.n_per_prompt} --seed {args.seed}{methods}")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse `python -m utils.toy.table OUT [--quick] ...`."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("output_dir", help="folder for the table and every piece of it (a rerun resumes there)")
    p.add_argument("--model", default=str(ROOT / "assets" / "toy-sd"),
                   help="toy world 2 pipeline folder (python -m utils.toy train)")
    p.add_argument("--quick", action="store_true",
                   help=f"CI form: {', '.join(QUICK)}; {QUICK_N} images per prompt; steps x {QUICK_STEPS}")
    by_slug = {slug(m): m for m in METHODS}
    p.add_argument("--methods", nargs="+", choices=list(METHODS), default=None, type=lambda m: by_slug.get(m, m),
                   help="rows to run, by name or folder name (esd-x-3-red-blue); SD always runs (it is the reference); "
                        "None: all, or QUICK with --quick")
    p.add_argument("--n_per_prompt", type=int, default=None, help=f"images per prompt; None: 8, {QUICK_N} with --quick")
    p.add_argument("--seed", type=int, default=0, help="seed of the image seeds, the training and the attack")
    p.add_argument("--batch_size", type=int, default=64, help="images per generate.py pipeline call")
    p.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda or cuda:N")
    args = p.parse_args(argv)
    args.n_per_prompt = args.n_per_prompt or (QUICK_N if args.quick else 8)
    if args.n_per_prompt < 1 or args.batch_size < 1:
        p.error("--n_per_prompt and --batch_size must be positive")
    args.methods = ["SD"] + [m for m in (args.methods or (QUICK if args.quick else METHODS)) if m != "SD"]
    args.model = Path(args.model).expanduser().resolve()
    return args


def main(args: argparse.Namespace) -> list[dict]:
    """Every row (cached ones read back), then the table files; prints the table."""
    settings = {"model_sha256": check_model(args.model), "n_per_prompt": args.n_per_prompt, "seed": args.seed,
                "quick": args.quick}
    if (out := Path(args.output_dir)).exists() and not out.is_dir():
        raise UserError(f"{out} exists and is not a folder")
    t0, rows = time.time(), []
    setup_logging(out, "toy_table.log")
    log.info("toy_table %s", " ".join(sys.argv[1:]))
    for name in args.methods:
        try:
            rows.append(run_row(args, name, settings))
        except Stopped as e:  # Ctrl-C / SIGTERM in a trainer or the attack, after its checkpoint
            raise Stopped(f"{e}\nthe table continues from there: rerun `{command(args)}`", e.exit_code - 128) from None
    md = write_outputs(args, rows, settings)
    log.info("table of %d methods in %.0f s (this invocation)", len(rows), time.time() - t0)
    print(md)
    print(f"wrote {out / 'table.md'}, table.csv, table.png, samples.png ({time.time() - t0:.0f} s)")
    return rows


if __name__ == "__main__":
    run(main, parse_args)
