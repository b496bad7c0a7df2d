"""How well does an erasure survive as a LoRA of each rank? Answer: docs/lora.md (commands: docs/notes/lora_rank.md).

Toy-world check of erasure LoRAs: every colour's rate with the full erased U-Net and with its LoRA at several
ranks (loaded with diffusers' load_lora_weights into the base pipeline), on the same seeds; and LoRAs loaded together.

Rows: the base model; per --erasures LABEL=FILE the full erasure (the file applied onto the base U-Net, as OUT/unet),
the same with only the tensors a LoRA can hold (biases and norms left at the base's: the limit of a LoRA's rank),
and its LoRA at each --ranks; with --combine, the erasures' deltas summed and their LoRAs loaded together at each
--combine_ranks. Columns: rank (per-layer range), delta energy the LoRA keeps (left-out biases count as lost), file
size, the erased colours' explicit / paraphrase / implied rates and the other colours' same-seed preservation
against the base model (utils.toy.measure.erasure), shape accuracy, and the largest change of a rate against the full
erasure (points). The erased colours are read from the erasure files' concepts. The table (markdown) and JSON go to --output_dir, with the LoRA files.

    python -m experiments.lora_rank --erasures esd=outputs/toy-esd/erasure.safetensors \\
        sdd=outputs/toy-sdd/erasure.safetensors --ranks 1 2 4 8 full \\
        --combine outputs/toy-esd/erasure.safetensors outputs/toy-esd-blue/erasure.safetensors --threads 1
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from functools import partial
from pathlib import Path
from typing import Sequence

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from utils.cli import (ArgumentParser, HelpFormatter, UserError, add_threads_arg, apply_threads,  # noqa: E402
                       resolve_device, run)
from utils.lora import apply_loras, erasure_deltas, export_lora, lora_layers, rank_arg  # noqa: E402
from utils.gen.pipelines import quiet_diffusers  # noqa: E402
from utils.eval.common import write_json  # noqa: E402
from utils.saving import atomic_write_text  # noqa: E402
from utils.toy import measure as M  # noqa: E402
from utils.toy.cli import erased_colours  # noqa: E402


def load_pipeline(model: str, loras: Sequence[str] = (), device: str = "cpu"):
    """The base toy pipeline, with LoRAs loaded through diffusers' load_lora_weights (loading notices hidden)."""
    with quiet_diffusers():
        pipe = M.load_pipeline(model, None, device)
        apply_loras(pipe, [(path, 1.0) for path in loras])
    return pipe


def labelled(text: str) -> tuple[str, Path]:
    """argparse type of --erasures: LABEL=PATH."""
    label, sep, path = text.partition("=")
    if not sep or not label or not path:
        raise argparse.ArgumentTypeError(f"{text!r}: expected LABEL=PATH, e.g. esd=OUT/erasure.safetensors")
    return label, Path(path)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line flags (see --help)."""
    p = ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--model", default=str(ROOT / "assets" / "toy-sd"), help="the base toy pipeline")
    p.add_argument("--erasures", nargs="+", type=labelled, default=[], help="LABEL=erasure.safetensors to measure")
    p.add_argument("--ranks", nargs="+", type=rank_arg, default=[1, 2, 4, 8, "full"], help="LoRA ranks per erasure")
    p.add_argument("--combine", nargs="+", type=Path, action="append", default=[],
                   help="erasure files whose LoRAs load together (repeat the flag for several groups)")
    p.add_argument("--combine_ranks", nargs="+", type=rank_arg, default=[4, "full"], help="ranks of the combined LoRAs")
    p.add_argument("--save_precision", choices=["fp32", "fp16", "bf16"], default="fp16", help="dtype of the LoRAs")
    p.add_argument("--output_dir", default=str(ROOT / "outputs" / "lora_rank"),
                   help="LoRA files, table.md and results.json (this benchmark's own files there are rewritten)")
    p.add_argument("--n_per_prompt", type=int, default=20, help="images per prompt")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial latents (utils.toy.measure)")
    p.add_argument("--steps", type=int, default=20, help="DDIM inference steps")
    p.add_argument("--guidance_scale", type=float, default=5.0, help="classifier-free guidance scale")
    p.add_argument("--batch_size", type=int, default=64, help="images per pipeline call")
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    add_threads_arg(p)
    p.add_argument("--sd_sizes", action="store_true", help="only print the LoRA file sizes for Stable Diffusion 1.x's "
                   "U-Net shapes (built on the meta device, no weights) at --ranks, per fine-tuning method")
    args = p.parse_args(argv)
    if not args.erasures and not args.combine and not args.sd_sizes:
        p.error("give --erasures LABEL=FILE ... and/or --combine FILE FILE ..., or --sd_sizes")
    for flag in ("n_per_prompt", "steps", "batch_size"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag} must be at least 1")
    return args


def add_deltas(unet: torch.nn.Module, erasures: Sequence[Path], model: str, lora_only: bool = False) -> None:
    """Add each erasure's delta (erased - base) onto `unet` in place; with lora_only, only what a LoRA can hold."""
    params = dict(unet.named_parameters())
    with torch.no_grad():
        for path in erasures:
            deltas, base_unet, _ = erasure_deltas(path, model)
            left_out = lora_layers(deltas, base_unet)[1] if lora_only else {}
            for name, delta in deltas.items():
                if name not in left_out:
                    params[name] += delta.to(params[name].device, params[name].dtype)


def row(name: str, weights: str, res: dict, rank: str = "", kept: float | None = None, size: int | None = None) -> dict:
    """One table row from a Judge's result."""
    return dict(model=name, weights=weights, rank=rank, kept=kept, size_kib=None if size is None else size / 1024,
                colour_rate=res["colour_rate"], shape_acc=res["shape_acc"])


def rank_text(summary: dict) -> str:
    """'4', or '16-32' when the layers' ranks differ."""
    ranks = sorted(summary["ranks"].values())
    return str(ranks[0]) if ranks[0] == ranks[-1] else f"{ranks[0]}-{ranks[-1]}"


class Judge:
    """Erasure numbers of a pipeline against the base model on the same seeds, for a set of erased colours."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args, self.cache = args, {}
        self.kw = dict(num_inference_steps=args.steps, guidance_scale=args.guidance_scale, batch_size=args.batch_size)

    def __call__(self, pipe, concepts: Sequence[str]) -> dict:
        """{colour_rate: erased colours' rates per kind and the kept shares, shape_acc} of `pipe` (None: the base
        model, whose images are drawn once and are the reference of every other pipeline)."""
        key = tuple(concepts)
        if key not in self.cache:
            items = M.erasure_items(concepts, self.args.n_per_prompt, self.args.seed)
            self.cache[key] = items, M.draw(load_pipeline(self.args.model, device=self.args.device), items, **self.kw)
        items, before = self.cache[key]
        res = M.erasure(items, before, before if pipe is None else M.draw(pipe, items, **self.kw), concepts)
        rates = {f"{c} {k}": res["after"][k][c] for c in concepts for k in M.KINDS}
        rates.update({"neighbour kept": res["preserved_neighbours"], "others kept": res["preserved_others"]})
        return dict(colour_rate=rates, shape_acc=res["shape_acc_after"])


def measure_loras(args, name: str, erasures: Sequence[Path], ranks, out: Path, judge: Judge) -> list[dict]:
    """The base model, the full erasure(s) and the LoRAs at each rank, loaded together when there are several."""
    concepts = list(dict.fromkeys(c for e in erasures for c in erased_colours(e)))
    judge = partial(judge, concepts=concepts)
    rows = [row(name, "base model", judge(None))]
    pipe = load_pipeline(args.model, device=args.device)
    add_deltas(pipe.unet, erasures, args.model)
    rows.append(row(name, "full U-Net", judge(pipe), size=sum(p.stat().st_size for p in erasures)))
    pipe = load_pipeline(args.model, device=args.device)
    add_deltas(pipe.unet, erasures, args.model, lora_only=True)  # an untruncated LoRA: the limit of rank -> full
    rows.append(row(name, "full, LoRA layers only", judge(pipe), "", None) | {"full": rows[1]})
    print(format_rows(rows, header=False), flush=True)
    for rank in ranks:
        summaries = [export_lora(e, out / f"{name}-{i}-r{rank}.safetensors", rank=rank, base=args.model,
                                 save_precision=args.save_precision, device=args.device, overwrite=True)
                     for i, e in enumerate(erasures)]
        pipe = load_pipeline(args.model, [s["path"] for s in summaries], args.device)
        kept = sum(s["retained_total"] for s in summaries) / len(summaries)
        rows.append(row(name, f"LoRA r={rank}", judge(pipe), " + ".join(rank_text(s) for s in summaries), kept,
                        sum(s["size_bytes"] for s in summaries)) | {"full": rows[1]})
        print(format_rows(rows[-1:], header=False), flush=True)
    return rows


def format_rows(rows: list[dict], header: bool = True) -> str:
    """Markdown table; max Δ: the largest |rate - the full erasure's rate| over the columns, in points."""
    colours = list(rows[0]["colour_rate"])
    lines = []
    if header:
        lines = ["| model | weights | rank | energy kept | size KiB | " + " | ".join(colours) + " | shape | max Δ |",
                 "|" + "---|" * (7 + len(colours))]
    for r in rows:
        ref = r.get("full")
        delta = "" if ref is None else \
            f"{max(100 * abs(r['colour_rate'][c] - ref['colour_rate'][c]) for c in colours):.1f}"
        kept = "" if r["kept"] is None else f"{100 * r['kept']:.1f}%"
        size = "" if r["size_kib"] is None else f"{r['size_kib']:.1f}"
        rates = " | ".join(f"{100 * r['colour_rate'][c]:.1f}" for c in colours)
        lines.append(f"| {r['model']} | {r['weights']} | {r['rank']} | {kept} | {size} | {rates} | "
                     f"{100 * r['shape_acc']:.1f} | {delta} |")
    return "\n".join(lines)


def sd_sizes(ranks: Sequence[int | str], methods: Sequence[str] = ("xattn", "noxattn")) -> str:
    """Markdown table: erasure file vs fp16 LoRA size for SD 1.x's U-Net (diffusers' defaults, 768-wide text)."""
    from utils.families import FAMILIES
    from utils.families.shaped import sd_unet

    with torch.device("meta"):
        unet = sd_unet(cross_attention_dim=768)
    modules = dict(unet.named_modules())
    lines = ["| finetuning_method | layers | erasure file (fp32) | " + " | ".join(f"LoRA r={r}" for r in ranks) + " |",
             "|" + "---|" * (3 + len(ranks))]
    for method in methods:
        params = {n: p for n, p in unet.named_parameters() if FAMILIES["sd"].SUBSETS[method](n)}
        layers = [modules[n[:-len(".weight")]].weight for n in params if n.endswith(".weight")
                  and isinstance(modules[n[:-len(".weight")]], (torch.nn.Linear, torch.nn.Conv2d))]
        sizes = []
        for r in ranks:  # per layer: down (k x in) + up (out x k) + alpha, in fp16; k = r capped by the layer
            caps = [min(len(w), w[0].numel()) for w in layers]
            n = sum((c if r == "full" else min(int(r), c)) * (len(w) + w[0].numel()) + 1 for w, c in zip(layers, caps))
            sizes.append(f"{2 * n / 2 ** 20:.2f} MiB")
        full = sum(p.numel() for p in params.values()) * 4 / 2 ** 20
        lines.append(f"| {method} | {len(layers)} | {full:.1f} MiB | " + " | ".join(sizes) + " |")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> list[dict]:
    """Measure every row, print the table, write table.md and results.json."""
    if args.sd_sizes:
        print(sd_sizes(args.ranks))
        return []
    for _, path in args.erasures:
        if not path.is_file():
            raise UserError(f"erasure file {path} does not exist")
    for path in (p for files in args.combine for p in files):
        if not path.is_file():
            raise UserError(f"--combine file {path} does not exist")
    apply_threads(args.threads, resolve_device(args.device))
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    settings = dict(n_per_prompt=args.n_per_prompt, seed=args.seed, num_inference_steps=args.steps,
                    guidance_scale=args.guidance_scale, batch_size=args.batch_size)

    judge, rows, tables = Judge(args), [], []
    groups = [(label, [path], args.ranks) for label, path in args.erasures]
    for files in args.combine:
        groups.append(("+".join(p.parent.name or p.stem for p in files), files, args.combine_ranks))
    for name, erasures, ranks in groups:
        rows += (group := measure_loras(args, name, erasures, ranks, out, judge))
        tables.append(format_rows(group))
    table = "\n\n".join(tables)
    cmd = "python -m experiments.lora_rank " + " ".join(sys.argv[1:])
    text = (f"{cmd}\n{args.n_per_prompt} images per prompt, seed {args.seed}, {args.steps} DDIM steps, guidance "
            f"{args.guidance_scale}, LoRAs in {args.save_precision}; {time.time() - t0:.0f} s\n\n{table}\n")
    print("\n" + text)
    atomic_write_text(out / "table.md", text)
    rows = [{k: v for k, v in r.items() if k != "full"} for r in rows]
    write_json(out / "results.json", dict(settings=settings, rows=rows))
    return rows


if __name__ == "__main__":
    run(main, parse_args)
