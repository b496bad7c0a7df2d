"""Wall-clock training time until SDD erases a colour in the toy world: our trainer against the reference layout.

Every run trains SDD on assets/toy-sd with the same hyperparameters and seed. Runs advance in turns of --check_every
steps (reference, ours, ours with --trajectory_reuse R, ...), so that a busy machine slows them alike; after each
turn the run's EMA teacher (SDD's result) is judged with utils.toy.measure.erasure against the base model, same
seeds: the run has erased the concept once the concept's rate on its explicit prompts is <= --max_concept_rate and
every other colour keeps >= --min_other_rate of its images (same colour, shape and place). Only training
steps are timed: loading, checkpoints, resumes and checks are not (ours is resumed from its checkpoint every turn,
so the real trainer, train_sdd.main, runs unchanged). The quality at the stop is then measured again on fresh seeds.

    python -m benchmarks.time_to_erase --threads 1
    python -m benchmarks.time_to_erase --runs reference ours ours-r5 ours-r10 ours-r20 --max_steps 450 --threads 1
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TQDM_DISABLE", "1")

from benchmarks.step_timing import StepWatcher, watching  # noqa: E402
from utils.cli import ArgumentParser, HelpFormatter, UserError, run  # noqa: E402
from utils.saving import checkpoint_weights  # noqa: E402

TOY_DIR = ROOT / "assets" / "toy-sd"
RUN_RE = re.compile(r"^(reference|ours)(?:-m(\d+))?(?:-r(\d+))?(?:-b(\d+))?$")


@dataclass
class RunSpec:
    """One contestant: the reference layout, or our trainer with M trajectory samples, reuse R and batch B."""

    name: str
    layout: str
    trajectory_samples: int
    trajectory_reuse: int
    batch: int | None


def run_spec(text: str) -> RunSpec:
    """'reference', 'ours', or ours with options: -mM (--trajectory_samples M), -rR (--trajectory_reuse R),
    -bB (--train_batch_size B) in that order, e.g. 'ours-m4-b1', 'ours-r20'."""
    m = RUN_RE.match(text)
    if not m or (m.group(1) == "reference" and any(m.groups()[1:])):
        raise argparse.ArgumentTypeError(f"{text!r}: expected reference, ours or ours[-mM][-rR][-bB]")
    return RunSpec(text, m.group(1), int(m.group(2) or 1), int(m.group(3) or 1), int(m.group(4)) if m.group(4) else None)


# ------------------------------------------------------------------------------------------------ contestants
class _StepTimer(StepWatcher):
    """Adds up our trainer's step times: from "training starts" (or the previous step) to each logged step."""

    def __init__(self) -> None:
        super().__init__()
        self.last: float | None = None
        self.seconds = 0.0
        self.steps = 0

    def started(self) -> None:
        self.last = time.perf_counter()

    def stepped(self, step: int, k: int) -> None:
        now = time.perf_counter()
        if self.last is not None:
            self.seconds += now - self.last
            self.steps += 1
        self.last = now


@dataclass
class Contestant:
    """A run's state between turns."""

    spec: RunSpec
    args: argparse.Namespace
    steps: int = 0
    seconds: float = 0.0
    done: bool = False
    erased_at: int | None = None
    checks: list = field(default_factory=list)
    ref: object = None
    final: dict | None = None

    def advance(self, n: int) -> None:
        """Train n more steps; add their time."""
        if self.spec.layout == "reference":
            for _ in range(n):
                t0 = time.perf_counter()
                self.ref.step()
                self.seconds += time.perf_counter() - t0
            self.steps += n
            return
        import train_sdd
        timer = _StepTimer()
        self.args.num_train_steps = self.steps + n
        self.args.resume_from_checkpoint = "latest" if self.steps else None
        with watching(timer), contextlib.redirect_stdout(io.StringIO()):
            train_sdd.main(self.args)
        if timer.steps != n:
            raise RuntimeError(f"{self.spec.name}: expected {n} timed steps, got {timer.steps}")
        self.seconds += timer.seconds
        self.steps += n

    def teacher_state(self) -> dict:
        """The EMA teacher's tensors (ours: the trained subset from the last checkpoint; reference: the full U-Net)."""
        if self.spec.layout == "reference":
            return {k: v.detach().clone() for k, v in self.ref.result().state_dict().items()}
        return checkpoint_weights(Path(self.args.output_dir) / f"checkpoint-{self.steps}")


def make_contestant(spec: RunSpec, args: argparse.Namespace, out_root: Path) -> Contestant:
    """Build a run's trainer arguments (the same flags for both layouts) and, for the reference, its loop."""
    import train_sdd
    out = out_root / spec.name
    if out.exists() and any(out.iterdir()):
        raise UserError(f"{out} is not empty: pick another --output_dir")
    from utils import toy
    if args.removal == "captions":  # c_p = c_s = one caption of the colour per step
        removal = ["--removing_concepts", *[toy.language.fill(toy.TEMPLATES[0], args.concept, s) for s in toy.SHAPES],
                   "--removal_target", "current"]
    else:
        removal = ["--removing_concepts", args.concept]
    argv = ["--pretrained_model_name_or_path", str(args.model), *removal,
            "--learning_rate", str(args.learning_rate), "--ema_decay", str(args.ema_decay),
            "--num_ddim_steps", str(args.num_ddim_steps), "--guidance_scale", str(args.guidance_scale),
            "--train_batch_size", str(spec.batch or args.train_batch_size), "--seed", str(args.seed),
            "--trajectory_samples", str(spec.trajectory_samples), "--trajectory_reuse", str(spec.trajectory_reuse),
            "--num_train_steps", str(args.max_steps),
            "--checkpointing_steps", str(args.check_every), "--checkpoints_total_limit", "1",
            "--output_dir", str(out), "--device", "cpu", "--overwrite_output_dir"]  # each turn extends the last
    import torch
    argv += ["--threads", str(torch.get_num_threads())]  # the count main() set (or torch's), not the trainer's auto
    if args.resolution:
        argv += ["--resolution", str(args.resolution)]
    targs = train_sdd.parse_args(argv)
    c = Contestant(spec, targs)
    if spec.layout == "reference":
        from benchmarks.reference_layout import ReferenceLayout
        c.ref = ReferenceLayout(targs)
    return c


# ------------------------------------------------------------------------------------------------ judging
class Judge:
    """Erasure numbers of a U-Net state against the base model, same seeds (utils.toy.measure.erasure): the concept's
    explicit-prompt rate, and for every other colour the share of its images preserved."""

    def __init__(self, model: Path, concept: str) -> None:
        from utils.toy import measure
        self.M, self.concept = measure, concept
        self.pipe = measure.load_pipeline(model)
        self.base = {k: v.clone() for k, v in self.pipe.unet.state_dict().items()}
        self.before: dict = {}  # (n, seed) -> the base model's images

    def __call__(self, state: dict | None, n: int, seed: int, colours: list[str] | None = None) -> dict:
        """colour_rate: the concept's explicit rate, the other colours' preservation; shape accuracy."""
        items = self.M.erasure_items([self.concept], n, seed)
        if colours == [self.concept]:  # the cheap check: only the concept's explicit prompts
            items = [it for it in items if it.group == "explicit"]
        key = (n, seed, len(items))
        if key not in self.before:
            self.pipe.unet.load_state_dict(self.base)
            self.before[key] = self.M.draw(self.pipe, items)
        self.pipe.unet.load_state_dict({**self.base, **(state or {})})
        res = self.M.erasure(items, self.before[key], self.M.draw(self.pipe, items), [self.concept])
        rates = {self.concept: res["after"]["explicit"][self.concept], **res["preserved"]}
        return dict(colour_rate=rates, shape_acc=res["shape_acc_after"], erasure=res)


def erased(res: dict, concept: str, max_rate: float, min_other: float) -> bool:
    """The stop rule: concept rate <= max_rate, every other colour's rate >= min_other."""
    return res["colour_rate"][concept] <= max_rate and all(
        r >= min_other for c, r in res["colour_rate"].items() if c != concept)


def check(judge: Judge, state: dict, args: argparse.Namespace) -> tuple[bool, dict]:
    """The concept first (cheap); the other colours only when it is gone."""
    res = judge(state, args.n_per_prompt, args.seed, [args.concept])
    if res["colour_rate"][args.concept] > args.max_concept_rate:
        return False, res
    res = judge(state, args.n_per_prompt, args.seed)
    return erased(res, args.concept, args.max_concept_rate, args.min_other_rate), res


# ------------------------------------------------------------------------------------------------ report
def format_table(rows: list[dict], base: dict, header: str, concept: str) -> str:
    """Markdown: time to erase per run, its ratio to the reference, and the quality at the stop (fresh seeds)."""
    colours = list(base["colour_rate"])
    ref = next((r for r in rows if r["layout"] == "reference" and r["erased_at"] is not None), None)
    lines = [header, "",
             "| run | M | R | batch | steps to erase | train s to erase | s/step | time vs reference | "
             + " | ".join(f"{c} %" for c in colours) + " | shape % |",
             "|---|---:|---:|---:|---:|---:|---:|---:|" + "---:|" * (len(colours) + 1)]
    lines.append("| base model | | | | | | | | " + " | ".join(f"{100 * base['colour_rate'][c]:.1f}" for c in colours)
                 + f" | {100 * base['shape_acc']:.1f} |")
    for r in rows:
        q = r["final"]
        steps = r["erased_at"] if r["erased_at"] is not None else f"not in {r['steps']}"
        secs = f"{r['seconds_to_erase']:.1f}" if r["erased_at"] is not None else f">{r['seconds']:.1f}"
        ratio = (f"**{r['seconds_to_erase'] / ref['seconds_to_erase']:.2f}**"
                 if ref and r["erased_at"] is not None else "n/a")
        lines.append(f"| {r['name']} | {r['trajectory_samples']} | {r['trajectory_reuse']} | {r['batch']} | {steps} | {secs} | "
                     f"{r['seconds'] / max(r['steps'], 1):.3f} | {ratio} | "
                     + " | ".join(f"{100 * q['colour_rate'][c]:.1f}" for c in colours)
                     + f" | {100 * q['shape_acc']:.1f} |")
    lines.append("")
    lines.append(f"{concept} % = share of its explicit-prompt images the judge sees in {concept} (lower is better); other "
                 f"colours % = share of their images preserved (same colour, shape and place as the base model's, same "
                 f"seed); shape % over all prompts.")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ command line
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Flags of the time-to-erase benchmark."""
    from utils.toy import COLOURS
    p = ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--model", default=str(TOY_DIR), help="toy pipeline folder (utils.toy train)")
    p.add_argument("--runs", nargs="+", type=run_spec, metavar="RUN",
                   default=[run_spec(s) for s in ("reference", "ours", "ours-r5", "ours-r10")],
                   help="contestants: reference, ours, ours[-mM][-rR][-bB] (--trajectory_samples M, --trajectory_reuse "
                        "R, --train_batch_size B)")
    p.add_argument("--concept", choices=list(COLOURS), default="red", help="colour to erase")
    p.add_argument("--removal", choices=("captions", "word"), default="word",
                   help="what SDD removes: the bare word (c_s = 'red'), or the colour's captions ('a red circle', ... one per "
                        "step, c_s = c_p)")
    p.add_argument("--learning_rate", type=float, default=1e-4, help="AdamW learning rate (both layouts)")
    p.add_argument("--ema_decay", type=float, default=0.99, help="SDD's EMA decay m (both layouts)")
    p.add_argument("--num_ddim_steps", type=int, default=20, help="N: DDIM steps of the teacher's trajectory")
    p.add_argument("--guidance_scale", type=float, default=3.0, help="s_g: CFG scale of the teacher's trajectory")
    p.add_argument("--train_batch_size", type=int, default=4, help="z_T samples per step (unless a run sets -bB)")
    p.add_argument("--resolution", type=int, default=0, help="image size (0: the model's own)")
    p.add_argument("--max_steps", type=int, default=600, help="give up after this many steps")
    p.add_argument("--check_every", type=int, default=25, help="steps per turn; the teacher is judged after each")
    p.add_argument("--n_per_prompt", type=int, default=8, help="images per prompt in a check (12 prompts)")
    p.add_argument("--final_n_per_prompt", type=int, default=20, help="images per prompt for the quality at the stop")
    p.add_argument("--max_concept_rate", type=float, default=0.10, help="erased: the concept's explicit rate <= this")
    p.add_argument("--min_other_rate", type=float, default=0.90, help="... and every other colour keeps >= this")
    p.add_argument("--seed", type=int, default=0, help="training seed (both layouts) and the checks' sample seed")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--output_dir", default=None, help="where our runs write (default: a temp dir, removed)")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)
    for flag in ("num_ddim_steps", "train_batch_size", "max_steps", "check_every", "n_per_prompt",
                 "final_n_per_prompt"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag} must be >= 1")
    if len({r.name for r in args.runs}) != len(args.runs):
        p.error("--runs names must be distinct")
    if args.max_steps % args.check_every:
        p.error("--max_steps must be a multiple of --check_every (our runs resume from the turn's checkpoint)")
    return args


def main(args: argparse.Namespace) -> list[dict]:
    """Train every run in turns until it has erased the concept (or hit --max_steps); print the table."""
    import torch
    model = Path(args.model)
    if not (model / "model_index.json").exists():
        raise UserError(f"{model} is not a pipeline folder: train the toy model with `python -m utils.toy train`")
    if args.threads:
        torch.set_num_threads(args.threads)
    from utils.toy import COLOURS
    colours = list(COLOURS)
    if args.concept not in colours:
        raise UserError(f"--concept {args.concept} is not a toy colour")
    judge = Judge(model, args.concept)
    t0 = time.time()
    base = judge(None, args.final_n_per_prompt, args.seed + 1)
    print(f"base model: {json.dumps({c: round(r, 3) for c, r in base['colour_rate'].items()})}, "
          f"shape {base['shape_acc']:.3f} ({time.time() - t0:.0f} s)", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        out_root = Path(args.output_dir) if args.output_dir else Path(tmp)
        runs = [make_contestant(s, args, out_root) for s in args.runs]
        while not all(r.done for r in runs):
            for r in runs:
                if r.done:
                    continue
                n = min(args.check_every, args.max_steps - r.steps)
                r.advance(n)
                state = r.teacher_state()
                ok, res = check(judge, state, args)
                r.checks.append(dict(step=r.steps, seconds=r.seconds, colour_rate=res["colour_rate"]))
                rates = " ".join(f"{c} {v:.2f}" for c, v in res["colour_rate"].items())
                print(f"{r.spec.name:>12} step {r.steps:4d} train {r.seconds:7.1f} s  {rates}{'  ERASED' if ok else ''}",
                      flush=True)
                if ok or r.steps >= args.max_steps:
                    r.done = True
                    r.erased_at = r.steps if ok else None
                    r.final = judge(state, args.final_n_per_prompt, args.seed + 1)
        rows = [dict(name=r.spec.name, layout=r.spec.layout, trajectory_samples=r.spec.trajectory_samples,
                     trajectory_reuse=r.spec.trajectory_reuse,
                     batch=r.args.train_batch_size, steps=r.steps, seconds=r.seconds, erased_at=r.erased_at,
                     seconds_to_erase=r.seconds if r.erased_at is not None else None, final=r.final, checks=r.checks)
                for r in runs]
    header = (f"SDD on {args.model} removing {args.concept!r} ({args.removal}): lr {args.learning_rate}, "
              f"EMA {args.ema_decay}, batch {args.train_batch_size} unless -bB, "
              f"N = {args.num_ddim_steps}, s_g {args.guidance_scale}, checks every {args.check_every} steps "
              f"({args.n_per_prompt}/prompt), erased = {args.concept} <= {args.max_concept_rate} and others >= "
              f"{args.min_other_rate}; quality at the stop on fresh seeds ({args.final_n_per_prompt}/prompt); "
              f"{torch.get_num_threads()} thread(s)")
    print()
    print(format_table(rows, base, header, args.concept))
    if args.json:
        Path(args.json).write_text(json.dumps(dict(rows=rows, base=base, argv=sys.argv[1:]), indent=1))
    return rows


if __name__ == "__main__":
    run(main, parse_args)
