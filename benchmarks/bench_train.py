"""Per-step time and peak memory of SDD and ESD training steps: our trainer against the reference code's layout.

Each (layout, method, precision) runs in its own process, alternating ours / reference: OUR numbers come from the
real trainer (train_sdd.main / train_esd.main), the REFERENCE numbers from benchmarks/reference_layout.py (two full
U-Nets, text encoded every step, EMA over every U-Net parameter). Both draw the same k, z_T and t from the same seed,
so they do the same teacher work step by step. Peak memory is taken from the start of the first training step to
the end of the last (resident weights included): VmHWM after `echo 5 > /proc/self/clear_refs` on the CPU,
torch.cuda.max_memory_allocated after a reset on a GPU; "load peak" is the peak before that (loading, casting).

    python -m benchmarks.bench_train --model sd14 --resolution 128 --mixed_precision no bf16
    python -m benchmarks.bench_train --model tiny --steps 2 --warmup 0       # a smoke test
"""
from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from benchmarks.step_timing import GIB, Meter, StepWatcher, format_table, summarize, watching  # noqa: E402
from utils.cli import ArgumentParser, HelpFormatter, UserError, run  # noqa: E402

MODELS = ("sd14", "sdxl", "toy", "tiny")
PRECISIONS = ("no", "bf16", "fp16")
TOY_DIR = ROOT / "assets" / "toy-sd"
CONCEPT = {"sd14": "nudity", "sdxl": "nudity", "toy": "red", "tiny": "nudity"}


# ------------------------------------------------------------------------------------------------ model folders
def prepare_model(model: str, model_dir: str | None, scratch: Path, width: float = 1.0) -> Path:
    """The pipeline folder for --model: built (sd14, sdxl at `width` in a subprocess, so this process stays small),
    or assets/toy-sd."""
    if model == "toy":
        if not (TOY_DIR / "model_index.json").exists():
            raise UserError(f"{TOY_DIR} does not exist yet: train it with `python -m utils.toy train` first")
        return TOY_DIR
    folder = Path(model_dir) if model_dir else scratch / model
    if (folder / "model_index.json").exists():
        return folder
    if model == "tiny":
        from utils.families.tiny import build_tiny_pipeline
        return build_tiny_pipeline(folder)
    shape = ["--family", "sdxl", "--width", str(width)] if model == "sdxl" else []
    print(f"building a {model}-shaped pipeline with random weights in {folder} ...", flush=True)
    subprocess.run([sys.executable, "-m", "benchmarks.sd_shaped", str(folder), *shape], cwd=ROOT, check=True)
    return folder


# ------------------------------------------------------------------------------------------------ measuring
class _Done(BaseException):
    """Raised by the probe after the last measured step: the run's result is not saved (not part of a step)."""


class _StepProbe(StepWatcher):
    """Resets the meter when training starts, marks each step, stops the run after the last measured one."""

    def __init__(self, meter: Meter, steps: int) -> None:
        super().__init__()
        self.meter, self.steps, self.ks = meter, steps, []

    def started(self) -> None:
        self.meter.reset()

    def stepped(self, step: int, k: int) -> None:
        self.meter.mark_step()
        self.ks.append(k)
        if step >= self.steps:
            self.meter.read_peak()
            raise _Done


def train_argv(spec: dict, out: Path) -> list[str]:
    """Our trainer's command line for a benchmark run (the reference layout parses the same flags)."""
    argv = ["--pretrained_model_name_or_path", spec["model_path"], "--output_dir", str(out),
            "--removing_concepts", CONCEPT[spec["model"]], "--num_train_steps", str(spec["steps"]),
            "--num_ddim_steps", str(spec["num_ddim_steps"]), "--seed", str(spec["seed"]),
            "--mixed_precision", spec["precision"], "--finetuning_method", spec["finetuning_method"],
            "--train_batch_size", str(spec["train_batch_size"]), "--checkpointing_steps", str(spec["steps"] + 10 ** 6)]
    if spec["resolution"]:
        argv += ["--resolution", str(spec["resolution"])]
    if spec["device"]:
        argv += ["--device", spec["device"]]
    if spec["gradient_checkpointing"]:
        argv += ["--gradient_checkpointing"]
    if spec.get("conv_autotune") and spec["layout"] == "ours":
        argv += ["--conv_autotune"]
    if spec.get("optimizer_in_backward"):  # both layouts then run without clipping; only ours steps in backward
        argv += ["--max_grad_norm", "0"] + (["--optimizer_in_backward"] if spec["layout"] == "ours" else [])
    import torch
    argv += ["--threads", str(torch.get_num_threads())]  # the count worker() set (or torch's), not the trainer's auto
    return argv + list(spec.get("extra", []))


def worker(spec: dict) -> dict:
    """Run one layout in this process and return its measurements."""
    import torch

    import train_esd
    import train_sdd
    from utils.cli import resolve_device

    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    device = str(resolve_device(spec["device"]))
    meter = Meter(device)
    mod = train_sdd if spec["method"] == "sdd" else train_esd
    with tempfile.TemporaryDirectory() as tmp:
        args = mod.parse_args(train_argv(spec, Path(tmp) / "out"))
        if spec["layout"] == "ours":
            probe = _StepProbe(meter, spec["steps"])
            with watching(probe), contextlib.suppress(_Done):
                mod.main(args)
            ks, phases = probe.ks, None
        else:
            from benchmarks.reference_layout import ReferenceLayout
            ref = ReferenceLayout(args, grads=spec["reference_grads"])
            meter.reset()
            ks, phases = [], []
            for _ in range(spec["steps"]):
                info = ref.step()
                meter.mark_step()
                ks.append(info["k"])
                phases.append(info["phases"])
            meter.read_peak()
    res = meter.result()
    if len(res["step_s"]) != spec["steps"]:
        raise RuntimeError(f"{spec['layout']} run measured {len(res['step_s'])} of {spec['steps']} steps")
    return dict(spec, **res, ks=ks, phases=phases, device_name=device,
                threads=torch.get_num_threads())


def run_worker(spec: dict, scratch: Path) -> dict:
    """One layout in a fresh process (so that its peak is its own)."""
    name = f"{spec['layout']}-{spec['method']}-{spec['precision']}-{spec['repeat']}"
    spec_path, out_path = scratch / f"{name}.spec.json", scratch / f"{name}.result.json"
    spec_path.write_text(json.dumps(spec))
    proc = subprocess.run([sys.executable, "-m", "benchmarks.bench_train", "--worker", str(spec_path), str(out_path)],
                          cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0 or not out_path.exists():
        tail = "\n".join((proc.stderr or "").strip().splitlines()[-15:])
        raise UserError(f"the {name} run failed (exit {proc.returncode}):\n{tail}")
    return json.loads(out_path.read_text())


# ------------------------------------------------------------------------------------------------ report
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Flags of the benchmark (and the hidden --worker entry point)."""
    p = ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--model", choices=MODELS, default="sd14",
                   help="sd14: SD-1.4-shaped, random weights; sdxl: SDXL-base-shaped at --sdxl_width; toy: "
                        "assets/toy-sd; tiny: a few-KB test pipeline")
    p.add_argument("--sdxl_width", type=float, default=0.5,
                   help="--model sdxl: channels as a share of SDXL base's (0.5: its shape at a quarter of the "
                        "parameters, so that the reference layout fits in 24 GiB; 1.0: SDXL base, 2.57 B)")
    p.add_argument("--model_dir", default=None,
                   help="folder for the built sd14/sdxl/tiny pipeline, reused when present (default: a temp dir)")
    p.add_argument("--resolution", type=int, default=128, help="image size in pixels (0: the model's own)")
    p.add_argument("--mixed_precision", nargs="+", choices=PRECISIONS, default=["no"],
                   help="precisions to measure; ours casts frozen weights, the reference autocasts fp32 weights")
    p.add_argument("--methods", nargs="+", choices=("sdd", "esd"), default=["sdd", "esd"], help="methods to measure")
    p.add_argument("--layouts", nargs="+", choices=("ours", "reference"), default=["ours", "reference"],
                   help="layouts to measure (ratios need both)")
    p.add_argument("--steps", type=int, default=3, help="optimizer steps per run")
    p.add_argument("--warmup", type=int, default=1, help="first steps left out of the median time")
    p.add_argument("--repeats", type=int, default=1, help="runs per layout, alternating ours / reference")
    p.add_argument("--num_ddim_steps", type=int, default=10,
                   help="N: each step samples k ~ U[0, N-1] teacher steps (time grows with k; see the k column)")
    p.add_argument("--finetuning_method", choices=("xattn", "xattn-strict", "noxattn", "selfattn", "notime", "full"),
                   default="xattn", help="trained U-Net parameters")
    p.add_argument("--train_batch_size", type=int, default=1, help="z_T samples per step")
    p.add_argument("--gradient_checkpointing", action="store_true",
                   help="recompute activations in backward (ours only: the reference code has no such option)")
    p.add_argument("--conv_autotune", action="store_true",
                   help="ours with --conv_autotune (per-shape convolution kernel choice; the reference keeps stock "
                        "kernels); its one-time timing falls in the warm-up step")
    p.add_argument("--optimizer_in_backward", action="store_true",
                   help="ours with --optimizer_in_backward (no gradient of the subset held at once); both layouts "
                        "then run with --max_grad_norm 0")
    p.add_argument("--reference_grads", choices=("subset", "all"), default="subset",
                   help="reference student's parameters that require grad: the trained subset (in its favour) or "
                        "all of them (as the reference code leaves it)")
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[],
                   help="further trainer flags for both layouts, e.g. --extra --timestep_jitter (must come last)")
    p.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    p.add_argument("--threads", type=int, default=0,
                   help="CPU threads per run (0: torch's default); 1 is steadier on a machine shared with other jobs")
    p.add_argument("--seed", type=int, default=0, help="seed of k, z_T and t (the same in both layouts)")
    p.add_argument("--json", default=None, help="also write the raw measurements and the table rows here")
    p.add_argument("--worker", nargs=2, default=None, metavar=("SPEC", "OUT"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker is None:
        for flag in ("steps", "repeats", "num_ddim_steps", "train_batch_size"):
            if getattr(args, flag) < 1:
                p.error(f"--{flag} must be >= 1")
        if not 0 <= args.warmup < args.steps:
            p.error("--warmup must be in [0, --steps)")
    return args


def main(args: argparse.Namespace) -> list[dict]:
    """Measure every (method, precision) for both layouts, print the table, return its rows."""
    if args.worker:
        spec = json.loads(Path(args.worker[0]).read_text())
        Path(args.worker[1]).write_text(json.dumps(worker(spec)))
        return []
    import torch

    from utils.cli import resolve_device
    device = str(resolve_device(args.device))
    scratch = Path(tempfile.mkdtemp(prefix="bench_train-"))
    try:
        model_path = prepare_model(args.model, args.model_dir, scratch, args.sdxl_width)
        results, failed = run_all(args, model_path, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    if not results:
        raise UserError(f"every run failed; the first: {failed[0]['error']}")
    rows = summarize(results, args.warmup)
    name = torch.cuda.get_device_name() if device.startswith("cuda") else f"cpu ({os.cpu_count()} cores)"
    header = (f"model {args.model}, {args.resolution or 'native'} px, N = {args.num_ddim_steps} DDIM steps, "
              f"{args.finetuning_method}, batch {args.train_batch_size}, {name}, {args.steps} steps per run "
              f"({args.warmup} warm-up), {args.repeats} run(s) per layout, reference grads: {args.reference_grads}, "
              f"{args.threads or 'default'} thread(s)"
              + (", ours with gradient checkpointing" if args.gradient_checkpointing else "")
              + (", ours with --conv_autotune" if args.conv_autotune else "")
              + (", ours with --optimizer_in_backward, no clipping" if args.optimizer_in_backward else ""))
    print()
    print(format_table(rows, header))
    if args.json:
        _write_json(args.json, rows, results, failed)
    return rows


def run_all(args: argparse.Namespace, model_path: Path, scratch: Path) -> tuple[list[dict], list[dict]]:
    """Each (method, precision, repeat, layout) in its own process; a run that fails is listed, the others go on."""
    results, failed = [], []
    for method, prec, repeat, layout in itertools.product(args.methods, args.mixed_precision, range(args.repeats),
                                                          args.layouts):
        spec = dict(layout=layout, method=method, precision=prec, repeat=repeat, model=args.model,
                    model_path=str(model_path), steps=args.steps, resolution=args.resolution,
                    num_ddim_steps=args.num_ddim_steps, finetuning_method=args.finetuning_method,
                    train_batch_size=args.train_batch_size, seed=args.seed, device=args.device,
                    gradient_checkpointing=args.gradient_checkpointing, conv_autotune=args.conv_autotune,
                    optimizer_in_backward=args.optimizer_in_backward,
                    reference_grads=args.reference_grads, extra=args.extra, threads=args.threads)
        t0 = time.time()
        try:
            res = run_worker(spec, scratch)
        except UserError as e:  # e.g. out of memory: the other runs still count
            failed.append(dict(spec, error=str(e)))
            print(f"{layout:>9} {method} {prec:<4} #{repeat}: failed: {str(e).splitlines()[-1]}")
            continue
        results.append(res)
        print(f"{layout:>9} {method} {prec:<4} #{repeat}: s/step {['%.2f' % s for s in res['step_s']]}"
              f" k {res['ks']} peak {res['peak'] / GIB:.2f} GiB ({time.time() - t0:.0f} s)", flush=True)
        if args.json:  # after every run: a time limit loses only the run in progress
            _write_json(args.json, None, results, failed)
    return results, failed


def _write_json(path: str, rows: list[dict] | None, results: list[dict], failed: list[dict]) -> None:
    """The table rows (None until every run is done), the raw measurements and the failed runs."""
    Path(path).write_text(json.dumps(dict(rows=rows, results=results, failed=failed, argv=sys.argv[1:]), indent=1))


if __name__ == "__main__":
    run(main, parse_args)
