"""`python -m utils.toy {train,judge,quality,compare,panels,prompts}`: train the toy model, check the judge, measure.

  python -m utils.toy train --output_dir outputs/toy-sd                 # seeded, CPU, ~1 h (shipped flags: docs/toy_world.md)
  python -m utils.toy train --family sdxl --output_dir outputs/toy-sdxl # the same world in SDXL's shape (assets/toy-sdxl)
  python -m utils.toy train --recipe toy3 --vae_from assets/toy-sd      # toy 3, SD 1.x's recipe (assets/toy3-sd)
  python -m utils.toy train --family sdxl --recipe toy3 --vae_from assets/toy-sd  # toy 3 as SDXL was built
  python -m utils.toy judge                                             # the judge on freshly rendered images
  python -m utils.toy quality --model assets/toy-sd                     # base quality (docs/toy_world.md numbers)
  python -m utils.toy compare --unet OUT/unet --output OUT/before_after.png   # erasure table + the picture
  python -m utils.toy panels --unet OUT/unet --output panels.png        # base | erased, side by side
  python -m utils.toy prompts --concepts red --output red.csv           # the same prompts as a generate.py file
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Sequence

import numpy as np

import torch

from utils.cli import ArgumentParser, HelpFormatter, UserError, add_threads_arg, apply_threads, run
from utils.eval.common import write_json, write_png
from utils.toy import measure as M
from utils.toy.grids import before_after_grid, panel_grid, quality_grid
from utils.toy.judge import judge
from utils.toy.language import COLOURS, with_articles
from utils.toy.render import make_dataset
from utils.toy.train import DEFAULT_GUIDANCE, DEFAULT_STEPS, train
from utils.toy.train_flags import add_train_parser, resolve_recipe


def _pct(x: float) -> str:
    return "  n/a" if x != x else f"{100 * x:5.1f}"


def format_quality(res: dict) -> str:
    """Rows: colours; columns: explicit / paraphrase / implied rates and shape accuracy; then the empty prompt's mix."""
    lines = [f"{'colour':<8} {'explicit%':>9} {'paraphrase%':>11} {'implied%':>8} {'shape%':>6}"]
    for c in res["rate"].get("explicit", {}):
        r = res["rate"]
        lines.append(f"{c:<8} {_pct(r['explicit'][c]):>9} {_pct(r['paraphrase'][c]):>11} {_pct(r['implied'][c]):>8} "
                     f"{_pct(res['shape_acc'][c]):>6}")
    lines.append(f"{'all':<8} {'':>9} {'':>11} {'':>8} {_pct(res['shape_acc']['all']):>6}")
    if res["empty_mix"]:
        lines.append("empty prompt draws: " + ", ".join(f"{c} {_pct(v).strip()}%" for c, v in res["empty_mix"].items() if v))
    return "\n".join(lines)


def format_erasure(res: dict, seconds: float | None = None) -> str:
    """One table: per erased colour its explicit / paraphrase / implied rate before and after (and after by the lenient
    reading), then preservation."""
    lines = [f"{'':<34} {'before':>7} {'after':>7}"]
    for c in res["concepts"]:
        for kind in M.KINDS:
            label = f"{c} rate, {kind}{' (objects)' if kind == 'implied' else ''}"
            lines.append(f"{label:<34} {_pct(res['before'][kind][c]):>7} {_pct(res['after'][kind][c]):>7}")
        # the lenient reading: off-palette shades nearer this colour than any other count as this colour
        lenient = " / ".join(_pct(res["after_nearest"][kind][c]).strip() for kind in M.KINDS)
        lines.append(f"  {c}, lenient reading (nearest palette colour), explicit / paraphrase / implied: {lenient}")
    kept = res["preserved"]
    neighbours = M.neighbours_of(res["concepts"])
    if neighbours:
        lines.append(f"{'neighbour preserved (' + ', '.join(neighbours) + ')':<34} {'':>7} "
                     f"{_pct(res['preserved_neighbours']):>7}")
    others = ", ".join(f"{c} {_pct(v).strip()}" for c, v in kept.items() if c not in neighbours)
    lines.append(f"{'other colours preserved':<34} {'':>7} {_pct(res['preserved_others']):>7}   ({others})")
    lines.append(f"{'shape accuracy':<34} {_pct(res['shape_acc_before']):>7} {_pct(res['shape_acc_after']):>7}")
    if seconds is not None:
        lines.append(f"{'training time (s)':<34} {'':>7} {seconds:>7.0f}")
    lines.append("what each colour's prompts draw after (judged colours, %):")
    lines += [f"  {c:<8} {format_mix(mix)}" for c, mix in res["drawn_after"].items()]
    return "\n".join(lines)


def format_mix(mix: dict[str, float], top: int = 2) -> str:
    """The `top` most frequent judged colours with their shares, e.g. 'blue 96.9, other 3.1'."""
    best = sorted(mix.items(), key=lambda kv: -kv[1])[:top]
    return ", ".join(f"{c} {_pct(v).strip()}" for c, v in best)


def training_seconds(unet_path: str | Path) -> float | None:
    """The training time a trainer logged next to its result (OUT/train.log), every leg of a resumed run added up;
    None when there is none."""
    from utils.saving import run_folder
    from utils.train.log_time import training_seconds_in

    log = run_folder(unet_path) / "train.log"
    return training_seconds_in(log.read_text(encoding="utf-8")) if log.is_file() else None


def erased_colours(unet_path: str | Path) -> list[str]:
    """The colours an erasure removed, from the concepts in its erasure file (a U-Net folder's OUT/erasure.safetensors)."""
    from utils.saving import read_erasure, run_folder
    from utils.toy.language import parse_prompt

    path = Path(unet_path)
    if not path.exists():
        raise UserError(f"--unet {unet_path} does not exist")
    file = path if path.is_file() else run_folder(path) / "erasure.safetensors"
    if not file.is_file():
        raise UserError(f"no erasure file beside {unet_path} to read the erased concepts from: pass --concepts")
    concepts = json.loads(read_erasure(file)[1].get("concepts", "[]"))
    colours = list(dict.fromkeys(c for c in (parse_prompt(x)[0] for x in concepts) if c))
    if not colours:
        raise UserError(f"the concepts of {file} ({concepts}) name no toy colour: pass --concepts")
    return colours


def main_judge(args: argparse.Namespace) -> None:
    """`judge`: the judge's accuracy on freshly rendered images of every colour and shape."""
    images, labels = make_dataset(args.n, args.seed)
    verdicts = [judge(im) for im in images]
    print(f"judge on {args.n} rendered images (seed {args.seed}): colour "
          f"{100 * np.mean([v[0] == l[0] for v, l in zip(verdicts, labels)]):.2f}%, shape "
          f"{100 * np.mean([v[1] == l[1] for v, l in zip(verdicts, labels)]):.2f}%")
    for c in COLOURS:
        ok = [v[0] == c for v, l in zip(verdicts, labels) if l[0] == c]
        print(f"  {c:<7} {100 * np.mean(ok):.2f}% of {len(ok)}")


def _sampling(args: argparse.Namespace) -> dict:
    """The sampling flags as keyword arguments of measure.draw."""
    return dict(num_inference_steps=args.steps, guidance_scale=args.guidance_scale, batch_size=args.batch_size)


def main_quality(args: argparse.Namespace) -> dict:
    """`quality`: a model's explicit / paraphrase / implied colour rates, shape accuracy and the empty prompt's mix."""
    out = _png_output(args.output) if args.output else None
    pipe = M.load_pipeline(args.model, args.unet, args.device)
    items = M.quality_items(args.n_per_prompt, args.seed, args.colours, empty=args.n_empty, an=M.uses_an(args.model))
    t0 = time.time()
    images = M.draw(pipe, items, desc="quality", **_sampling(args))
    res = M.quality(items, images)
    print(f"{args.model}{' + ' + str(args.unet) if args.unet else ''}: {args.n_per_prompt} images per prompt, seed "
          f"{args.seed}, {args.steps} DDIM steps, guidance {args.guidance_scale} ({time.time() - t0:.0f} s)")
    print(format_quality(res))
    if out:
        write_png(out, quality_grid(items, images, args.show))
        write_json(out.with_suffix(".json"), dict(settings=vars_of(args), **res))
        print(f"wrote {out} and {out.with_suffix('.json')}")
    return res


def _png_output(path: str) -> Path:
    """--output as a .png path whose folder exists (checked before the long part)."""
    out = Path(path)
    if out.suffix.lower() != ".png":
        raise UserError(f"--output {out} must be a .png file (the JSON goes beside it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    return out


def vars_of(args: argparse.Namespace) -> dict:
    """The parsed flags, JSON-ready."""
    return {k: v for k, v in vars(args).items() if k != "func"}


def main_compare(args: argparse.Namespace) -> dict:
    """`compare`: the base model against the same pipeline with an erased U-Net, seed for seed."""
    out = _png_output(args.output)
    args.concepts = args.concepts or erased_colours(args.unet)
    items = M.erasure_items(args.concepts, args.n_per_prompt, args.seed, an=M.uses_an(args.base))
    pipe = M.load_pipeline(args.base, None, args.device)
    erased = M.load_pipeline(args.base, args.unet, args.device)  # checked before the long part
    before = M.draw(pipe, items, desc="base model", **_sampling(args))
    after = M.draw(erased, items, desc="erased model", **_sampling(args))
    res = M.erasure(items, before, after, args.concepts)
    seconds = training_seconds(args.unet)
    print(f"erased {', '.join(args.concepts)}: {args.unet} against {args.base} ({args.n_per_prompt} images per prompt, "
          f"seed {args.seed}, {args.steps} DDIM steps, guidance {args.guidance_scale})")
    print(format_erasure(res, seconds))
    write_png(out, before_after_grid(items, before, after, args.concepts, args.show))
    write_json(out.with_suffix(".json"), dict(settings=vars_of(args), training_seconds=seconds, **res))
    print(f"wrote {out} and {out.with_suffix('.json')}")
    return res


# the prompts of the README's picture: red named, paraphrased and implied, its neighbour, then one of each other colour
PANEL_PROMPTS = ("a red circle", "red", "a circle in crimson", "an apple", "a brick", "a orange circle", "a pumpkin",
                 "a yellow triangle", "a green square", "a blue circle", "a purple triangle")


def main_panels(args: argparse.Namespace) -> Path:
    """`panels`: the same prompts and seeds drawn by the base model and by each labelled U-Net, side by side."""
    out = _png_output(args.output)
    models = [("base model", None)]
    for spec in args.unet:
        label, sep, path = spec.rpartition("=")
        if not Path(path).exists():
            raise UserError(f"--unet {spec}: {path} does not exist")
        models.append((label if sep else path, path))
    pipes = [(title, M.load_pipeline(args.base, unet, args.device)) for title, unet in models]  # all checked first
    n = args.n_per_prompt
    if M.uses_an(args.base):  # "an orange circle" on a model trained so (toy 3)
        args.prompts = list(dict.fromkeys(with_articles(p) for p in args.prompts))
    prompts = [p for p in args.prompts for _ in range(n)]
    seeds = [M.image_seed(p, j, args.seed) for p in args.prompts for j in range(n)]
    panels = []
    for title, pipe in pipes:
        images = M.sample_images(pipe, prompts, seeds, desc=title, **_sampling(args))
        panels.append((title, {p: images[i * n:(i + 1) * n] for i, p in enumerate(args.prompts)}))
    write_png(out, panel_grid(panels, show=min(args.show, n)))
    print(f"wrote {out}")
    return out


def main_prompts(args: argparse.Namespace) -> None:
    """`prompts`: the erasure (or quality) prompts with their seeds as a CSV for generate.py."""
    an = bool(args.model) and M.uses_an(args.model)
    items = M.erasure_items(args.concepts, args.n_per_prompt, args.seed, an) if args.concepts else \
        M.quality_items(args.n_per_prompt, args.seed, empty=args.n_per_prompt, an=an)
    M.write_items(items, args.output)
    print(f"wrote {len(items)} rows to {args.output}")


def _add_sampling_flags(p: argparse.ArgumentParser, n: int) -> None:
    p.add_argument("--n_per_prompt", type=int, default=n, help="images per prompt")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial latents (each image has its own)")
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="DDIM inference steps")
    p.add_argument("--guidance_scale", type=float, default=DEFAULT_GUIDANCE, help="classifier-free guidance scale")
    p.add_argument("--batch_size", type=int, default=64, help="images per pipeline call")
    p.add_argument("--show", type=int, default=6, help="images per prompt shown in the PNG grid")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    add_threads_arg(p)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse `python -m utils.toy {train,judge,quality,compare,panels,prompts} ...`."""
    parser = ArgumentParser(prog="python -m utils.toy", description=__doc__, formatter_class=HelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    add_train_parser(sub, train)

    p = sub.add_parser("judge", help="accuracy of the judge on freshly rendered images", formatter_class=HelpFormatter)
    p.add_argument("--n", type=int, default=2400, help="rendered images")
    p.add_argument("--seed", type=int, default=12345, help="seed of the rendering")
    p.set_defaults(func=main_judge)

    p = sub.add_parser("quality", help="a model's colour rates on explicit, paraphrase and implied prompts",
                       formatter_class=HelpFormatter)
    p.add_argument("--model", default="assets/toy-sd", help="pipeline folder")
    p.add_argument("--unet", default=None, help="optional U-Net folder or erasure file replacing the pipeline's")
    p.add_argument("--colours", nargs="+", choices=list(COLOURS), default=None, help="colours to measure (None: all)")
    p.add_argument("--n_empty", type=int, default=120, help="images of the empty prompt (its colour mix)")
    p.add_argument("--output", default=None, help="optional PNG grid of samples; JSON beside it")
    _add_sampling_flags(p, 20)
    p.set_defaults(func=main_quality)

    p = sub.add_parser("compare", help="base model vs an erased U-Net: table, PNG grid and JSON", formatter_class=HelpFormatter)
    p.add_argument("--base", default="assets/toy-sd", help="base pipeline folder")
    p.add_argument("--unet", required=True, help="erased U-Net folder (OUT/unet) or erasure file")
    p.add_argument("--concepts", nargs="+", default=None,
                   help=f"erased colours ({', '.join(COLOURS)}); None: read from the erasure file's concepts")
    p.add_argument("--output", required=True, help="PNG grid, before on the left, after on the right; JSON beside it")
    _add_sampling_flags(p, 8)
    p.set_defaults(func=main_compare)

    p = sub.add_parser("panels", help="base model and erased U-Nets side by side on the same prompts and seeds (PNG)",
                       formatter_class=HelpFormatter)
    p.add_argument("--base", default="assets/toy-sd", help="base pipeline folder")
    p.add_argument("--unet", nargs="+", required=True, help="LABEL=PATH (or PATH) of each erased U-Net folder or file")
    p.add_argument("--prompts", nargs="+", default=list(PANEL_PROMPTS), help="the rows")
    p.add_argument("--output", required=True, help="PNG file")
    _add_sampling_flags(p, 6)
    p.set_defaults(func=main_panels)

    p = sub.add_parser("prompts", help="the measurement prompts with per-image seeds as a generate.py CSV",
                       formatter_class=HelpFormatter)
    p.add_argument("--concepts", nargs="*", default=["red"], help="erased colours; none: the base-quality prompts")
    p.add_argument("--n_per_prompt", type=int, default=8, help="images per prompt")
    p.add_argument("--seed", type=int, default=0, help="seed of the per-image seeds")
    p.add_argument("--output", required=True, help="CSV file (prompt, evaluation_seed, group, asked_colour, asked_shape)")
    p.add_argument("--model", default=None, help="the toy model the prompts are for: its grammar ('an orange circle' "
                   "for toy 3, toy_language.json); default toy 2's")
    p.set_defaults(func=main_prompts)

    args = parser.parse_args(argv)
    if args.command == "train":
        resolve_recipe(args, parser)
    for name in ("n_per_prompt", "steps", "batch_size", "n", "n_images", "vae_steps", "unet_steps"):
        if getattr(args, name, 1) < 1:
            parser.error(f"--{name} must be positive")
    if not 0 <= getattr(args, "unet_ema_decay", 0) < 1:
        parser.error("--unet_ema_decay must be in [0, 1) (0: no average)")
    if getattr(args, "vae_rgb_weight", 0) < 0:
        parser.error("--vae_rgb_weight must not be negative")
    return args


def main(args: argparse.Namespace):
    """Run the chosen subcommand."""
    if hasattr(args, "threads"):
        apply_threads(args.threads, torch.device("cpu") if getattr(args, "device", "cpu") == "cpu" else
                      torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    return args.func(args)


if __name__ == "__main__":
    run(main, parse_args)
