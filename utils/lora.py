"""Erasure as a LoRA: export an erasure file's weight changes as low-rank pairs that diffusers' load_lora_weights loads.

  python -m utils.lora OUT/erasure.safetensors --rank 8          # -> OUT/erasure-lora-r8.safetensors
  python -m utils.lora OUT/erasure.safetensors --energy 0.9      # per layer, the smallest rank keeping 90%

Each trained Linear or Conv2d weight W becomes delta = W_erased - W_base (base: --pretrained_model_name_or_path,
default the erasure file's base_model), cut to rank r by a truncated SVD, delta ~ up @ down. Keys follow the kohya
style that kohya's sd-scripts writes for SD 1.x (A1111 and ComfyUI convert it; untested here): lora_unet_<module
path, "." -> "_">.lora_down.weight / .lora_up.weight / .alpha. One alpha serves every layer (the largest rank);
each up matrix carries r / alpha, so every loader, which scales by alpha / r, adds exactly the truncated delta.
Biases and norm weights have no LoRA form: they are left out, and their share of the delta's energy (sum of
squares) is printed. See docs/lora.md.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import warnings
from collections import Counter
from pathlib import Path
from typing import Sequence

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from utils.cli import ArgumentParser, HelpFormatter, UserError, resolve_device, run
from utils.saving import apply_erasure, atomic_write, read_erasure

LORA_FORMAT = "sdd-erasure-lora-v1"
PREFIX = "lora_unet_"  # kohya's prefix of the denoiser's keys; files record theirs (key_prefix) from the family
SAVE_PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
log = logging.getLogger("sdd")


def rank_arg(text: str) -> int | str:
    """argparse type of --rank: a positive integer or 'full' (every singular value)."""
    if text == "full":
        return text
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither a positive integer nor 'full'") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"rank must be at least 1, got {value}")
    return value


def energy_arg(text: str) -> float:
    """argparse type of --energy: a share in (0, 1]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"energy is a share in (0, 1], got {value}")
    return value


def lora_key(module: str, prefix: str = PREFIX, renames: dict[str, str] | None = None) -> str:
    """kohya-style key of a U-Net module: the family's prefix (lora_unet_) + its dotted path with '_' (or the name
    the family gives it there, Family.lora_renames)."""
    return prefix + (renames or {}).get(module, module).replace(".", "_")


# ----------------------------------------------------------------------------------------------------- export
def erasure_deltas(path: str | os.PathLike, base: str | None = None, revision: str | None = None,
                   variant: str | None = None) -> tuple[dict[str, torch.Tensor], torch.nn.Module, dict[str, str]]:
    """erased - base for every tensor of an erasure file, the base U-Net (erased weights applied) and the metadata."""
    from utils.families import family_of  # local: `python -m utils.lora` refuses bad input before these load
    from utils.loading import check_model_source

    tensors, meta = read_erasure(path)
    base = base or meta.get("base_model")
    if not base:
        raise UserError(f"{path} records no base_model; pass --pretrained_model_name_or_path")
    check_model_source(base)
    unet = family_of(base).load_unet(base, revision=revision, variant=variant)
    params = dict(unet.named_parameters())
    before = {n: params[n].detach().float().clone() for n in tensors if n in params}
    apply_erasure(unet, path)  # checks every name and shape against this base
    deltas = {n: params[n].detach().float() - before[n] for n in tensors}
    size = sum(d.pow(2).sum() for d in deltas.values()).sqrt() / sum(b.pow(2).sum() for b in before.values()).sqrt()
    if size > 0.5:
        print(f"warning: the erasure changes the weights by {100 * size:.0f}% of their norm; is {base} the model it "
              f"was trained from?")
    family = family_of(base)
    meta["base_model"], meta["key_prefix"] = base, family.lora_prefix
    if family.lora_renames:
        meta["key_renames"] = json.dumps(family.lora_renames)
    return deltas, unet, meta


def low_rank(delta: torch.Tensor, rank: int | None, energy: float | None) -> tuple[torch.Tensor, torch.Tensor, float]:
    """down (r, in, ...), up (out, r, ...): up @ down, the best rank-r fit of delta (r from rank/energy); kept share."""
    mat = delta.reshape(delta.shape[0], -1)
    u, s, vh = torch.linalg.svd(mat.double(), full_matrices=False)
    e = s.pow(2)
    r = len(s) if rank is None else min(rank, len(s))
    if energy is not None:
        share = torch.cumsum(e, 0) / e.sum()
        r = min(r, int(torch.searchsorted(share, torch.tensor(energy, dtype=share.dtype) - 1e-12)) + 1)
    root = s[:r].sqrt()
    down, up = root[:, None] * vh[:r], u[:, :r] * root
    if delta.ndim == 4:  # Conv2d: down is a conv with the layer's kernel, up a 1x1 conv
        down, up = down.reshape(r, *delta.shape[1:]), up.reshape(delta.shape[0], r, 1, 1)
    return down.float(), up.float(), float(e[:r].sum() / e.sum())


def lora_layers(deltas: dict[str, torch.Tensor],
                unet: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Split deltas into module -> weight delta for Linear/Conv2d weights, and the left-out names -> 'Class.leaf'."""
    modules = dict(unet.named_modules())
    layers, left_out = {}, {}
    for name, delta in deltas.items():
        module, _, leaf = name.rpartition(".")
        m = modules[module]
        if leaf == "weight" and (isinstance(m, torch.nn.Linear) or isinstance(m, torch.nn.Conv2d) and m.groups == 1):
            layers[module] = delta
        else:
            left_out[name] = f"{type(m).__name__}.{leaf}"
    return layers, left_out


def default_output(erasure: str | os.PathLike, rank: int | str | None, energy: float | None) -> Path:
    """OUT/erasure.safetensors -> OUT/erasure-lora-r8.safetensors (-e0.9, -e0.9-r8, -rfull)."""
    tag = "-".join(t for t in (f"e{energy:g}" if energy is not None else "", f"r{rank}" if rank else "") if t)
    path = Path(erasure)
    return path.with_name(f"{path.stem}-lora-{tag}.safetensors")


def export_lora(erasure: str | os.PathLike, output: str | os.PathLike | None = None, rank: int | str | None = None,
                energy: float | None = None, base: str | None = None, revision: str | None = None,
                variant: str | None = None, save_precision: str = "fp16", device: str | torch.device | None = None,
                overwrite: bool = False) -> dict:
    """Write an erasure file as a kohya-style LoRA; returns the summary (path, size, ranks, retained energy)."""
    if rank is None and energy is None:
        raise UserError("give --rank R (or 'full') and/or --energy E")
    out = Path(output) if output else default_output(erasure, rank, energy)
    if out.suffix != ".safetensors":
        raise UserError(f"the LoRA file must end in .safetensors (diffusers loads only those by name), got {out}")
    if out.exists() and not overwrite:
        raise UserError(f"{out} exists; pass --overwrite to replace it or --output to write elsewhere")
    deltas, unet, meta = erasure_deltas(erasure, base, revision, variant)
    layers, left_out = lora_layers(deltas, unet)
    if not layers:
        raise UserError(f"{erasure} trains no Linear or Conv2d weight, so there is nothing a LoRA can express")
    dev = resolve_device(device if device is None or isinstance(device, str) else str(device))
    cap = None if rank in (None, "full") else int(rank)
    pairs, kept, ranks = {}, {}, {}
    for module, delta in layers.items():
        if not delta.any():
            continue  # an untouched layer: nothing to add
        down, up, kept[module] = low_rank(delta.to(dev), cap, energy)
        pairs[module], ranks[module] = (down.cpu(), up.cpu()), down.shape[0]
    if not pairs:
        raise UserError(f"{erasure} does not differ from {meta['base_model']}: every delta is zero")
    alpha, prefix, renames = max(ranks.values()), meta["key_prefix"], json.loads(meta.get("key_renames", "{}"))
    tensors = {}
    for module, (down, up) in pairs.items():
        key = lora_key(module, prefix, renames)
        tensors[key + ".lora_down.weight"] = down
        tensors[key + ".lora_up.weight"] = up * (ranks[module] / alpha)
        tensors[key + ".alpha"] = torch.tensor(float(alpha))
    energy_of = {m: float(d.double().pow(2).sum()) for m, d in deltas.items()}
    total = sum(energy_of.values())
    layer_total = {m: energy_of[m + ".weight"] for m in pairs}
    summary = dict(path=str(out), layers=len(pairs), ranks=ranks, alpha=alpha, retained=kept, left_out=list(left_out),
                   left_out_kinds=dict(Counter(left_out.values())),
                   retained_exported=sum(kept[m] * layer_total[m] for m in pairs) / sum(layer_total.values()),
                   left_out_energy=sum(energy_of[n] for n in left_out) / total,
                   retained_total=sum(kept[m] * layer_total[m] for m in pairs) / total)
    info = {"format": LORA_FORMAT, "source": Path(erasure).name, "rank": str(rank or ""),
            "energy": "" if energy is None else str(energy), "save_precision": save_precision}
    dtype = SAVE_PRECISIONS[save_precision]
    tensors = {k: v.to(dtype).contiguous() for k, v in tensors.items()}
    atomic_write(out, lambda tmp: save_file(tensors, str(tmp), metadata=lora_metadata(summary, meta, info)))
    summary["size_bytes"] = out.stat().st_size
    log.info("LoRA %s: %s", out, json.dumps({k: v for k, v in summary.items() if k != "retained"}))
    return summary


def lora_metadata(summary: dict, erasure_meta: dict[str, str], info: dict[str, str]) -> dict[str, str]:
    """The LoRA file's metadata: `info`, the erasure's base model/method/concepts, ranks and retained energy."""
    copied = ("base_model", "key_prefix", "key_renames", "method", "finetuning_method", "concepts", "num_train_steps")
    return {**info, **{k: erasure_meta[k] for k in copied if k in erasure_meta},
            "alpha": str(summary["alpha"]), "ranks": json.dumps(summary["ranks"]),
            "retained_energy": json.dumps({m: round(v, 6) for m, v in summary["retained"].items()}),
            "retained_energy_total": f"{summary['retained_total']:.6f}", "left_out": json.dumps(summary["left_out"]),
            "left_out_energy": f"{summary['left_out_energy']:.6f}"}


def describe_export(summary: dict, erasure: str | os.PathLike) -> str:
    """The lines `python -m utils.lora` prints: file, size, ranks, retained energy, what is left out."""
    ranks = sorted(summary["ranks"].values())
    worst = min(summary["retained"], key=summary["retained"].get)
    lines = [f"wrote {summary['path']} ({summary['size_bytes'] / 1024:.1f} KiB; the erasure file is "
             f"{Path(erasure).stat().st_size / 1024:.1f} KiB)",
             f"{summary['layers']} layers, rank {ranks[0]}" + (f"-{ranks[-1]} (median {ranks[len(ranks) // 2]})"
                                                              if ranks[0] != ranks[-1] else "") +
             f", alpha {summary['alpha']}: the LoRA keeps {100 * summary['retained_exported']:.2f}% of these layers' "
             f"delta energy (lowest {100 * summary['retained'][worst]:.2f}% in {worst})"]
    if summary["left_out"]:
        kinds = ", ".join(f"{n} {k}" for k, n in sorted(summary["left_out_kinds"].items()))
        lines.append(f"left out (no LoRA form): {len(summary['left_out'])} tensors ({kinds}), "
                     f"{100 * summary['left_out_energy']:.2f}% of the delta energy; in all the LoRA keeps "
                     f"{100 * summary['retained_total']:.2f}%")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------- loading
def check_lora_args(paths: Sequence[str] | None, scales: Sequence[float] | None) -> list[tuple[str, float]]:
    """(path, scale) pairs from --lora_path/--lora_scale (one scale for all, or one per path); UserError if wrong."""
    if not paths:
        if scales:
            raise UserError("--lora_scale needs --lora_path")
        return []
    scales = list(scales or [1.0])
    if len(scales) not in (1, len(paths)):
        raise UserError(f"--lora_scale takes one value or one per --lora_path ({len(paths)}), got {len(scales)}")
    for path in paths:
        p = Path(path)
        if not p.is_file():
            raise UserError(f"--lora_path {path} is not a file")
        if p.suffix != ".safetensors":
            raise UserError(f"--lora_path {path}: diffusers loads LoRAs from .safetensors files only")
    return list(zip(paths, scales * len(paths) if len(scales) == 1 else scales))


def check_lora_fits(path: str | os.PathLike, unet: torch.nn.Module) -> None:
    """For a LoRA written by export_lora: every layer exists in `unet` with the shape it was made for."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            shapes = {k: f.get_slice(k).get_shape() for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for non-safetensors input
        raise UserError(f"LoRA {path} is not a safetensors file ({str(e).splitlines()[0]})") from None
    if meta.get("format") != LORA_FORMAT:
        return  # someone else's LoRA: diffusers checks it
    modules, prefix = dict(unet.named_modules()), meta.get("key_prefix", PREFIX)
    renames = json.loads(meta.get("key_renames", "{}"))
    for module in json.loads(meta["ranks"]):
        down = shapes[lora_key(module, prefix, renames) + ".lora_down.weight"]
        up = shapes[lora_key(module, prefix, renames) + ".lora_up.weight"]
        want = (up[0], *down[1:])
        m = modules.get(module)
        have = tuple(m.weight.shape) if m is not None and hasattr(m, "weight") else None
        if have != want:
            raise UserError(f"LoRA {path} does not fit this U-Net: {module} is {want} in the LoRA and "
                            f"{have or 'missing'} here; it was made for base model {meta.get('base_model', '?')}")


def apply_loras(pipe, loras: Sequence[tuple[str, float]]) -> list[str]:
    """Load each (path, scale) into `pipe` as adapter lora0, lora1, ... and activate them all with their scales."""
    from diffusers.utils import USE_PEFT_BACKEND
    from diffusers.utils import logging as diffusers_logging

    if loras and not USE_PEFT_BACKEND:
        raise UserError("loading LoRAs needs peft: pip install -r requirements.txt")
    names = []
    for i, (path, _) in enumerate(loras):
        check_lora_fits(path, pipe.unet)
        p = Path(path)
        old = diffusers_logging.get_verbosity()
        diffusers_logging.set_verbosity(diffusers_logging.CRITICAL)  # its logger.error would repeat ours at length
        try:
            with warnings.catch_warnings():  # peft warns that a second adapter makes several: that is the point
                warnings.filterwarnings("ignore", message="Already found a `peft_config`")
                pipe.load_lora_weights(str(p.parent), weight_name=p.name, adapter_name=f"lora{i}")
        except (ValueError, RuntimeError, OSError, KeyError) as e:
            raise UserError(f"could not load LoRA {path}: {' '.join(str(e).split())[:300]}") from None
        finally:
            diffusers_logging.set_verbosity(old)
        names.append(f"lora{i}")
    if names:
        pipe.set_adapters(names, adapter_weights=[float(s) for _, s in loras])
    return names


# ----------------------------------------------------------------------------------------------------- CLI
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line flags (see --help)."""
    p = ArgumentParser(prog="python -m utils.lora", description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("erasure", help="an erasure file (OUTPUT_DIR/erasure.safetensors of train_sdd.py/train_esd.py)")
    p.add_argument("--rank", type=rank_arg, default=None, help="rank of every layer (capped by the layer's size), "
                   "or 'full'; with --energy: the largest rank")
    p.add_argument("--energy", type=energy_arg, default=None,
                   help="per layer, the smallest rank keeping this share of the delta's energy (sum of squares)")
    p.add_argument("--output", default=None, help="the LoRA file; default: beside the erasure file, "
                   "erasure-lora-r{R}.safetensors / -e{E}.safetensors")
    p.add_argument("--pretrained_model_name_or_path", default=None,
                   help="the base model the delta is taken against; default: the erasure file's base_model")
    p.add_argument("--revision", default=None, help="hub revision of the base model")
    p.add_argument("--variant", default=None, help="weight variant of the base model, e.g. fp16")
    p.add_argument("--save_precision", choices=list(SAVE_PRECISIONS), default="fp16", help="dtype of the LoRA tensors")
    p.add_argument("--device", default=None, help="device of the SVDs (default: cuda when available, else cpu)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing LoRA file")
    args = p.parse_args(argv)
    if args.rank is None and args.energy is None:
        p.error("give --rank R (or 'full') and/or --energy E")
    return args


def main(args: argparse.Namespace) -> dict:
    """Export and print the summary."""
    summary = export_lora(args.erasure, args.output, args.rank, args.energy, args.pretrained_model_name_or_path,
                          args.revision, args.variant, args.save_precision, args.device, args.overwrite)
    print(describe_export(summary, args.erasure))
    return summary


if __name__ == "__main__":
    run(main, parse_args)
