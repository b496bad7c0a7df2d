"""Which settings erase a toy colour and keep the others? Answer: docs/notes/toy_sweeps.md (the demos' settings).

Hyperparameter sweep of an erasure method on the toy world: which settings erase a colour and keep the others.

Every combination of the --grid values trains once with the real trainer (train_sdd.py / train_esd.py), writing a
checkpoint every --check_every steps; each checkpoint's result (SDD: the EMA teacher, ESD: the student) is then
measured against the base model on the same seeds (utils.toy.measure.erasure: explicit / paraphrase / implied rate of
the erased colours, preservation of the neighbour and of the other colours, shape accuracy). Rows that meet the
toy-world targets are starred. Finished runs are not trained again (rerun to add combinations or measurements).

    python -m experiments.sweep_toy --method sdd --grid learning_rate=1e-4,3e-4 ema_decay=0.99,0.995 \\
        --max_steps 600 --check_every 100 --output_dir outputs/sweep-sdd
"""
from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import json
import os
from pathlib import Path
from typing import Sequence

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from utils.train.checkpoints import list_checkpoints  # noqa: E402
from utils.cli import (ArgumentParser, HelpFormatter, UserError, add_threads_arg, apply_threads, run,  # noqa: E402
                       same_flag_value)
from utils.eval.common import write_json  # noqa: E402
from utils.saving import atomic_write_text, checkpoint_weights  # noqa: E402
from utils.toy import measure as M  # noqa: E402

# the toy-world targets of the erasure demos (docs/toy_world.md)
TARGETS = dict(explicit=0.05, paraphrase=0.10, neighbours=0.90, others=0.90, shape=0.95)
# trainer flags shared by every combination unless the grid sets them (the toy demos' settings)
BASE_FLAGS = {"num_ddim_steps": 20, "train_batch_size": 4, "guidance_scale": 3.0, "seed": 0}


def parse_grid(items: Sequence[str]) -> dict[str, list[str]]:
    """['learning_rate=1e-4,3e-4', ...] -> {'learning_rate': ['1e-4', '3e-4'], ...}."""
    grid = {}
    for item in items:
        name, _, values = item.partition("=")
        if not name or not values:
            raise UserError(f"--grid entry {item!r} is not NAME=V1,V2,...")
        grid[name.lstrip("-")] = values.split(",")
    return grid


def combinations(grid: dict[str, list[str]]) -> list[dict[str, str]]:
    """Every combination of the grid's values, in order."""
    return [dict(zip(grid, values)) for values in itertools.product(*grid.values())]


def run_name(combo: dict[str, str]) -> str:
    """A folder name for a combination: lr1e-4_ema0.99 style."""
    short = {"learning_rate": "lr", "ema_decay": "ema", "negative_guidance": "eta", "guidance_scale": "sg",
             "train_batch_size": "b", "trajectory_reuse": "r", "finetuning_method": "ft"}
    return "_".join(f"{short.get(k, k)}{v}" for k, v in combo.items()) or "default"


def train_one(args: argparse.Namespace, combo: dict[str, str], out: Path) -> None:
    """Train one combination up to --max_steps with a checkpoint every --check_every steps (skipped when done)."""
    module = __import__(f"train_{args.method}")
    flags = {**BASE_FLAGS, **combo}
    argv = ["--pretrained_model_name_or_path", str(args.model), "--removing_concepts", *args.removing_concepts,
            "--num_train_steps", str(args.max_steps), "--checkpointing_steps", str(args.check_every),
            "--resume_from_checkpoint", "latest", "--device", "cpu", "--threads", str(torch.get_num_threads()),
            "--output_dir", str(out)]
    for k, v in flags.items():
        argv += [f"--{k}", str(v)]
    argv += args.extra  # last, so that its values win (argparse keeps the last)
    wanted = module.parse_args(argv)
    if (out / "unet").exists():  # finished: reused only when it is this run
        done = json.loads((out / "args.json").read_text(encoding="utf-8")) if (out / "args.json").is_file() else {}
        keys = ("method", "pretrained_model_name_or_path", "removing_concepts", "num_train_steps", *flags,
                *(a[2:] for a in args.extra if a.startswith("--")))
        diff = [k for k in keys if k in vars(wanted) and not same_flag_value(done.get(k), getattr(wanted, k))]
        if diff:
            raise UserError(f"{out} holds a finished run with other {', '.join(diff)}; use another --output_dir")
        return
    with contextlib.redirect_stdout(io.StringIO()):
        module.main(wanted)



def meets(res: dict) -> bool:
    """Every erased colour under the explicit/paraphrase targets, preservation and shapes over theirs."""
    ok = all(res["after"]["explicit"][c] <= TARGETS["explicit"] and res["after"]["paraphrase"][c] <= TARGETS["paraphrase"]
             for c in res["concepts"])
    neighbours = res["preserved_neighbours"]
    return (ok and (neighbours != neighbours or neighbours >= TARGETS["neighbours"])
            and res["preserved_others"] >= TARGETS["others"] and res["shape_acc_after"] >= TARGETS["shape"])


def format_rows(rows: list[dict]) -> str:
    """Markdown: one row per (combination, step)."""
    concepts = rows[0]["res"]["concepts"] if rows else []
    head = ["run", "step"] + [f"{c} {k} %" for c in concepts for k in M.KINDS] + \
        ["neighbour kept %", "others kept %", "neighbour drawn %", "others drawn %", "shape %", "meets targets"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        res = r["res"]
        cells = [r["run"], str(r["step"])] + [f"{100 * res['after'][k][c]:.1f}" for c in concepts for k in M.KINDS]
        cells += [f"{100 * v:.1f}" for v in (res["preserved_neighbours"], res["preserved_others"], *M.drawn_split(res))]
        cells += [f"{100 * res['shape_acc_after']:.1f}", "**yes**" if meets(res) else ""]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Flags of the sweep."""
    p = ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--method", choices=["sdd", "esd"], default="sdd", help="which trainer")
    p.add_argument("--model", default=str(ROOT / "assets" / "toy-sd"), help="toy pipeline folder")
    p.add_argument("--removing_concepts", nargs="+", default=["red"], help="concepts the trainer removes")
    p.add_argument("--concepts", nargs="+", default=None, help="colours measured as erased (default: the concepts)")
    p.add_argument("--grid", nargs="*", default=[], metavar="FLAG=V1,V2",
                   help="trainer flags and their values; every combination is one run")
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="further trainer flags, after everything else")
    p.add_argument("--max_steps", type=int, default=600, help="training steps of each run")
    p.add_argument("--check_every", type=int, default=100, help="measure every N steps (the checkpoints)")
    p.add_argument("--measure_from", type=int, default=0,
                   help="measure only the checkpoints at this step or later (a fine --check_every near a known step)")
    p.add_argument("--n_per_prompt", type=int, default=4, help="images per measurement prompt")
    p.add_argument("--steps", type=int, default=M.DEFAULT_STEPS, help="DDIM steps of the measurement images")
    p.add_argument("--seed", type=int, default=0, help="seed of the measurement images")
    add_threads_arg(p)
    p.add_argument("--output_dir", required=True, help="one folder per run, plus sweep.md and sweep.json")
    args = p.parse_args(argv)
    if args.max_steps < 1 or args.check_every < 1 or args.max_steps % args.check_every:
        p.error("--max_steps must be a positive multiple of --check_every")
    if not 0 <= args.measure_from <= args.max_steps:
        p.error(f"--measure_from must be between 0 and --max_steps ({args.max_steps}), not {args.measure_from}")
    return args


def main(args: argparse.Namespace) -> list[dict]:
    """Train every combination, measure every checkpoint, print and write the table."""
    apply_threads(args.threads, torch.device("cpu"))
    concepts = M.check_colours(args.concepts or args.removing_concepts)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    pipe = M.load_pipeline(args.model)
    base_state = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    items = M.erasure_items(concepts, args.n_per_prompt, args.seed, an=M.uses_an(args.model))
    before = M.draw(pipe, items, desc="base model", num_inference_steps=args.steps)
    rows = []
    for combo in combinations(parse_grid(args.grid)):
        name = run_name(combo)
        train_one(args, combo, out / name)
        for ckpt in list_checkpoints(out / name):
            step = int(ckpt.name.split("-")[1])
            if step < args.measure_from:
                continue
            pipe.unet.load_state_dict({**base_state, **checkpoint_weights(ckpt)})
            after = M.draw(pipe, items, desc=f"{name} step {step}", num_inference_steps=args.steps)
            res = M.erasure(items, before, after, concepts)
            rows.append(dict(run=name, step=step, flags=combo, res=res))
            print(format_rows(rows[-1:]).splitlines()[-1], flush=True)
    table = format_rows(rows)
    print(table)
    atomic_write_text(out / "sweep.md", f"{args.method} on {args.model}, removing {args.removing_concepts}\n\n{table}\n")
    write_json(out / "sweep.json", dict(args=vars(args), rows=rows))
    return rows


if __name__ == "__main__":
    run(main, parse_args)
