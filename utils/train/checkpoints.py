"""A run's bookkeeping: checks before anything is written, resumable checkpoints, the flags that make a resumed run
the same run, and stopping on SIGINT/SIGTERM after a checkpoint."""
from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from tqdm.auto import tqdm

from utils.cli import Stopped, UserError, same_flag_value
from utils.train.concepts import concept_steps_problem
from utils.train.preserve import read_preserve_prompts
from utils.train.trajectory import TrajectoryQueue
from utils.saving import atomic_dir
from utils.text import read_word_list

log = logging.getLogger("sdd")

# Flags that do not change what is learned (hardware, speed, where and how often things are written, validation);
# every other flag defines the run, so a checkpoint only continues under the same values.
NEUTRAL_FLAGS = frozenset({
    "device", "threads", "gradient_checkpointing", "optimizer_in_backward", "allow_tf32", "conv_autotune",
    "output_dir", "overwrite_output_dir", "checkpointing_steps", "checkpoints_total_limit", "resume_from_checkpoint",
    "validation_prompts", "validation_steps", "num_validation_images", "validation_guidance_scale",
    "export_lora_rank",
})
# lr schedules whose value at step s does not depend on --num_train_steps (a run with them may be extended)
LENGTH_FREE_SCHEDULES = ("constant", "constant_with_warmup")


@dataclass
class TrainState:
    """The live objects a checkpoint saves and restores."""

    subset: dict[str, torch.nn.Parameter]
    method: Any                      # utils.train.loop.Method: state_dict() / load_state_dict()
    optimizer: torch.optim.Optimizer
    lr_scheduler: Any
    scaler: torch.amp.GradScaler
    generator: torch.Generator
    queue: TrajectoryQueue


def list_checkpoints(output_dir: Path) -> list[Path]:
    """checkpoint-N folders holding a state.pt, oldest first."""
    found = [p for p in output_dir.glob("checkpoint-*") if checkpoint_step(p) is not None and (p / "state.pt").exists()]
    return sorted(found, key=checkpoint_step)


def checkpoint_step(path: Path) -> int | None:
    """N of a checkpoint-N folder (None for another name)."""
    m = re.fullmatch(r"checkpoint-(\d+)", path.name)
    return int(m.group(1)) if m else None


def in_backward_problem(args: argparse.Namespace) -> str | None:
    """Why --optimizer_in_backward cannot run with these flags (None: it can)."""
    if args.max_grad_norm > 0:
        return (f"--optimizer_in_backward needs --max_grad_norm 0 (got {args.max_grad_norm}): clipping to a global "
                "norm needs every gradient at once")
    if args.gradient_accumulation_steps > 1:
        return "--optimizer_in_backward needs --gradient_accumulation_steps 1: accumulating needs every gradient kept"
    if args.mixed_precision == "fp16":
        return "--optimizer_in_backward does not run with --mixed_precision fp16 (loss scaling); use bf16 or no"
    return None


def check_run_args(args: argparse.Namespace, method) -> tuple[list[str], list[str], list[str], Path | None, dict]:
    """Concepts, validation prompts, preserve prompts, the checkpoint to resume and the run's identity; UserError
    before any write.

    `method` (a utils.train.loop.Method class) checks its own flags and names those that do not define the run."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UserError("training runs on one device; launch it without --num_processes > 1 (generate.py scales out)")
    concepts = read_word_list(args.removing_concepts, "concepts (--removing_concepts)")
    val_prompts = read_word_list(args.validation_prompts, "validation prompts") if args.validation_prompts else []
    if args.concept_steps and (problem := concept_steps_problem(args.concept_steps, concepts, args.concept_method,
                                                                 args.num_train_steps)):
        raise UserError(problem)
    if not 1 <= args.trajectory_samples <= args.num_ddim_steps:
        raise UserError(f"--trajectory_samples must be in [1, --num_ddim_steps], got {args.trajectory_samples}")
    if not 1 <= args.trajectory_samples * args.trajectory_reuse <= args.num_ddim_steps:
        raise UserError(f"--trajectory_samples x --trajectory_reuse must be in [1, --num_ddim_steps = "
                        f"{args.num_ddim_steps}], got {args.trajectory_samples} x {args.trajectory_reuse}")
    for flag in ("num_train_steps", "num_ddim_steps", "train_batch_size", "gradient_accumulation_steps",
                 "checkpointing_steps", "validation_steps", "num_validation_images"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    if (args.checkpoints_total_limit or 0) < 0:
        raise UserError(f"--checkpoints_total_limit must be >= 0 (0 or unset: keep all), got "
                        f"{args.checkpoints_total_limit}")
    if args.optimizer_in_backward and (problem := in_backward_problem(args)):
        raise UserError(problem)
    preserve = read_preserve_prompts(args)
    method.check(args, concepts)
    resume = resolve_resume(args)
    if resume is not None and (checkpoint_step(resume) or 0) > args.num_train_steps:
        raise UserError(f"{resume} is past --num_train_steps {args.num_train_steps}; raise it or start a new "
                        f"--output_dir")
    check_output_dir(args, resume)
    identity = run_identity(args, concepts, NEUTRAL_FLAGS | method.neutral_flags)
    if preserve:
        identity["preserve_prompts"] = preserve  # the prompts as read, not the file's name
    if resume is not None:
        check_same_run(resume, identity)
    return concepts, val_prompts, preserve, resume, identity


def resolve_resume(args: argparse.Namespace) -> Path | None:
    """The checkpoint --resume_from_checkpoint names in --output_dir, None to start fresh (see find_checkpoint)."""
    return find_checkpoint(Path(args.output_dir), args.resume_from_checkpoint,
                           getattr(args, "overwrite_output_dir", False))


def find_checkpoint(folder: Path, request: str | None, overwrite: bool = False) -> Path | None:
    """The checkpoint to resume: `request` "latest" (the newest checkpoint-N in `folder`, None if there is none or
    when `overwrite`), a checkpoint-N folder (a path, or a name inside `folder`), or None (start fresh); UserError for
    a path that does not exist."""
    if not request:
        return None
    if request == "latest":
        if overwrite:
            return None  # the run scripts always pass latest: overwriting means starting afresh
        found = list_checkpoints(Path(folder))
        return found[-1] if found else None
    path = Path(request)
    inside = Path(folder) / path.name  # "checkpoint-500" names one in --output_dir, as in the diffusers examples
    if not (path / "state.pt").exists() and (inside / "state.pt").exists():
        path = inside
    if not (path / "state.pt").exists():
        raise UserError(f"checkpoint {path} does not exist (expected a checkpoint-N folder with state.pt)")
    return path


def check_output_dir(args: argparse.Namespace, resume: Path | None) -> None:
    """Refuse to overwrite or extend a finished run, or to ignore checkpoints silently."""
    out = Path(args.output_dir)
    blocked = next((p for p in (out, *out.parents) if p.exists() and not p.is_dir()), None)
    if blocked is not None:
        raise UserError(f"--output_dir {out}: {blocked} is a file, not a folder")
    if args.overwrite_output_dir:
        return
    done = [name for name in ("unet", "erasure.safetensors") if (out / name).exists()]
    if done:
        raise UserError(f"{out} already holds a finished run ({' and '.join(done)}); pick another --output_dir, or "
                        f"pass --overwrite_output_dir to replace it")
    if resume is None and list_checkpoints(out) and args.resume_from_checkpoint != "latest":
        raise UserError(f"{out} holds checkpoints; pass --resume_from_checkpoint latest or --overwrite_output_dir")


def run_identity(args: argparse.Namespace, concepts: Sequence[str] | None = None,
                 neutral: frozenset[str] = NEUTRAL_FLAGS) -> dict:
    """The flags that define the run (JSON values), with the concepts as read; --num_train_steps only if it matters."""
    ident = flag_identity(args, neutral)
    if concepts is not None:
        ident["removing_concepts"] = list(concepts)
    if (getattr(args, "lr_scheduler", None) in LENGTH_FREE_SCHEDULES
            and getattr(args, "concept_method", None) != "sequential"):
        ident.pop("num_train_steps", None)  # extending such a run changes nothing before its old end
    return ident


def flag_identity(args: argparse.Namespace, neutral: frozenset[str] | set[str]) -> dict:
    """Every flag of `args` but the `neutral` ones, sorted, as JSON values: what run.json holds and check_same_run
    compares (any program's flags)."""
    return json.loads(json.dumps({k: v for k, v in sorted(vars(args).items()) if k not in neutral}, default=str))


def check_same_run(path: Path, identity: dict) -> None:
    """UserError naming every flag whose value differs from the checkpoint's run (one line)."""
    saved_file = path / "run.json"
    if not saved_file.exists():
        log.warning("%s has no run.json (written by an older version): its flags cannot be checked", path)
        return
    saved = json.loads(saved_file.read_text(encoding="utf-8"))
    # a flag added after the checkpoint was written is the same run when it is left at its default None
    keys = sorted(set(saved) | {k for k, v in identity.items() if k in saved or v is not None})
    unset = "(not set)"
    diffs = [f"--{k} {saved.get(k, unset)} (now {identity.get(k, unset)})" for k in keys
             if not same_flag_value(saved.get(k), identity.get(k))]
    if diffs:
        raise UserError(f"checkpoint {path} belongs to a run with other flags: {', '.join(diffs)}; resume with its "
                        f"flags ({path / 'run.json'}) or start a new --output_dir")


def save_checkpoint(out: Path, step: int, state: TrainState, identity: dict, limit: int | None) -> Path:
    """checkpoint-N/ with state.pt (weights, optimizer, schedules, RNG, queued trajectories) and run.json; atomic."""
    return save_state(out, step, {
        "student": {n: p.detach().cpu() for n, p in state.subset.items()},
        "method": {n: v.detach().cpu() if torch.is_tensor(v) else v for n, v in state.method.state_dict().items()},
        "optimizer": state.optimizer.state_dict(),
        "lr_scheduler": state.lr_scheduler.state_dict(),
        "scaler": state.scaler.state_dict(),
        "trajectories": state.queue.state_dict(),
        "rng": rng_state(state.generator),
    }, identity, limit)


def save_state(out: Path, step: int, blob: dict, identity: dict, limit: int | None) -> Path:
    """out/checkpoint-{step}/ with state.pt ({"step": step, **blob}) and run.json (`identity`), written atomically;
    then only the newest `limit` checkpoints are kept (all when None or 0). Any resumable loop's checkpoint."""
    final = Path(out) / f"checkpoint-{step}"
    write_checkpoint(final, {"step": step, **blob}, identity)
    prune_checkpoints(Path(out), limit)
    log.info("saved %s", final)
    return final


def write_checkpoint(final: Path, blob: dict, identity: dict) -> None:
    """checkpoint-N/ with state.pt and the run's flags (run.json), written atomically."""
    with atomic_dir(final) as tmp:
        torch.save(blob, tmp / "state.pt")
        (tmp / "run.json").write_text(json.dumps(identity, indent=2), encoding="utf-8")


def load_state(path: Path, kind: str | None = None, what: str = "this program") -> dict:
    """The blob save_state wrote in checkpoint folder `path`; with `kind`, UserError (one line) unless the blob says
    it is one (blob["kind"]): a checkpoint of another program, or of an older format."""
    try:
        blob = torch.load(Path(path) / "state.pt", map_location="cpu", weights_only=False)
    except Exception as e:  # torch raises several types for files it cannot unpickle
        raise UserError(f"checkpoint {path} cannot be read ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''}); start a new --output_dir") from None
    if not isinstance(blob, dict) or "step" not in blob or (kind is not None and blob.get("kind") != kind):
        raise UserError(f"checkpoint {path} was not written by {what} in this version (another program's, or an "
                        f"older format); it cannot be resumed: start a new --output_dir")
    return blob


def rng_state(generator: torch.Generator | None) -> dict:
    """The RNG states a resumed run restores: `generator`'s, torch's global CPU one and every visible GPU's."""
    return {"generator": None if generator is None else generator.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def restore_rng(saved: dict, generator: torch.Generator | None) -> None:
    """Put back what rng_state saved (the GPUs' as far as as many are visible now; none if it saved none)."""
    if generator is not None:
        generator.set_state(saved["generator"])
    torch.set_rng_state(saved["torch"])
    if saved.get("cuda") is not None and torch.cuda.is_available():  # as many GPUs as are visible now
        for i, cuda_state in enumerate(saved["cuda"][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state, i)


def clear_run(out: Path) -> None:
    """Remove a run's checkpoints, result and validation grids from `out` (for --overwrite_output_dir)."""
    ours = [*list_checkpoints(out), out / "unet", out / "validation", out / "erasure.safetensors",
            *out.glob("erasure-lora-*.safetensors")]  # what a run writes, and nothing else
    for p in ours:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        elif p.exists() or p.is_symlink():
            p.unlink()


def prune_checkpoints(out: Path, limit: int | None) -> None:
    """Keep the newest `limit` checkpoints (all when None or 0)."""
    if limit:
        for old in list_checkpoints(out)[:-limit]:
            shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(path: Path, state: TrainState, device: torch.device) -> int:
    """Restore a checkpoint written by save_checkpoint into `state`; returns its step."""
    blob = load_state(path)
    if "student" not in blob:
        raise UserError(f"checkpoint {path} is not one of train_sdd.py / train_esd.py; start a new --output_dir")
    if blob["student"].keys() != state.subset.keys():
        raise UserError(f"checkpoint {path} trains other parameters than --finetuning_method asks for")
    with torch.no_grad():
        for n, p in state.subset.items():
            p.copy_(blob["student"][n])
    state.method.load_state_dict(blob["method"])
    state.optimizer.load_state_dict(blob["optimizer"])
    state.lr_scheduler.load_state_dict(blob["lr_scheduler"])
    state.scaler.load_state_dict(blob["scaler"])
    state.queue.load_state_dict(blob.get("trajectories", {}), device)
    restore_rng(blob["rng"], state.generator)
    return int(blob["step"])


class StopOnSignal:
    """Turns SIGINT/SIGTERM into 'save a checkpoint after this step, then stop' (a second signal stops at once)."""

    def __init__(self) -> None:
        self.raised, self.signum = False, None
        self.action = "saving a checkpoint after this step"  # what the first signal is answered with
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: no handler
                pass
        return self

    def _handle(self, signum, frame) -> None:
        if self.raised:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        self.raised, self.signum = True, signum
        tqdm.write(f"received {signal.Signals(signum).name}: {self.action} (again: stop now)")

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)

    def stopped(self, step: int, total: int, saved: Path | None, out: Path, resumed_latest: bool) -> Stopped:
        """The Stopped that ends the run (exit 128 + signal); its message, printed last, says how to continue."""
        again = "rerun the same command" if resumed_latest else \
            "rerun the same command with --resume_from_checkpoint latest"
        name = signal.Signals(self.signum).name if self.signum else "a signal"
        return Stopped(f"stopped by {name} at step {step} of {total}; saved {saved}; to continue, {again} "
                       f"(--output_dir {out})", self.signum or signal.SIGINT)


def run_steps(step: int, total: int, train_step: Callable[[int], None], save: Callable[[int], Path], every: int, *,
              out: Path, resumed_latest: bool, save_last: bool = False,
              ended: Callable[[int], None] | None = None) -> int:
    """A resumable loop (the attack's, the toy trainer's): train_step(s) takes the run from step s to s + 1 until
    `total`; save(s) writes checkpoint-s every `every` steps, at `total` with `save_last`, and after SIGINT/SIGTERM
    (once the step under way is done), which then ends the run with utils.cli.Stopped naming `out`. ended(step) runs
    when the loop ends either way (not on an exception); returns the step reached."""
    saved = None
    with StopOnSignal() as stop:
        while step < total and not stop.raised:
            train_step(step)
            step += 1
            if step % every == 0 or (save_last and step == total) or (stop.raised and step < total):
                saved = save(step)
        if ended is not None:
            ended(step)
        if stop.raised and step < total:  # exit 128 + signal, the hint as the last line
            stopped = stop.stopped(step, total, saved, out, resumed_latest)
            log.info(str(stopped))
            raise stopped
    return step
