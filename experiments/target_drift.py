"""Does SDD's target move with the student? Answer: docs/notes/toy_sweeps.md#how-far-the-target-moves.

How far an erasure moved the noise estimates it was not asked to move: SDD's moving target, measured.

SDD trains eps(z_t, c_s) towards the student's own eps(z_t, "") (stop-gradient); both go through the same weights,
so each step that moves the first can move the second. This compares a base and an erased U-Net on the same noisy
latents: the base model's samples of --prompts (initial noise seeded per image), noised to each of --timesteps with
fresh seeded noise. Every number is relative to the base model's gap ||eps(c) - eps("")|| for the concept c, per
latent, then averaged:

  uncond drift   ||eps'("") - eps("")||      SDD's target; 0 for a fixed target
  concept drift  ||eps'(c) - eps(c)||        how far the concept's estimate went
  kept drift     ||eps'(p) - eps(p)||        mean over --keep_prompts (what preservation should leave alone)
  gap left       ||eps'(c) - eps'("")||      0 when SDD's loss is met; 2 for ESD's eta 1 target e0 - (ec - e0)

An erasure that did only its job has a small uncond and kept drift next to its concept drift. It also prints how many
token positions of the concept's text encoding are nearly the empty prompt's (cross-attention keys and values that an
edit for the concept shares with the unconditional estimate). Several --unet are measured on the same latents and
summarised in one table (means over the timesteps); with --with_checkpoints each run's checkpoint-N folders come
first, so the table shows the drift growing over training.

    python -m experiments.target_drift --unet outputs/toy-sdd/unet outputs/toy-esd/unet --with_checkpoints
    python -m experiments.target_drift --model CompVis/stable-diffusion-v1-4 --unet outputs/sdd/unet \\
        --concept nudity --prompts "a photo of a person" --keep_prompts "a photo of a dog" --device cuda
"""
from __future__ import annotations

import argparse
import copy
import os
from pathlib import Path
from typing import Sequence

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from utils.cli import (ArgumentParser, HelpFormatter, UserError, add_threads_arg, apply_threads,  # noqa: E402
                       resolve_device, run)
from utils.eval.common import write_json  # noqa: E402
from utils.train.checkpoints import list_checkpoints  # noqa: E402
from utils.saving import load_unet_into, read_erasure, run_folder  # noqa: E402
from utils.families import FAMILIES  # noqa: E402
from utils.toy import measure as M  # noqa: E402
from utils.toy.language import COLOURS  # noqa: E402

COLUMNS = ("uncond", "concept", "kept", "gap")
FRACTIONS = (0.1, 0.3, 0.5, 0.7, 0.9)  # default timesteps, as fractions of the scheduler's num_train_timesteps
SHARED_COS = 0.95  # a token position whose encoding is this close to the empty prompt's counts as shared


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--model", default=str(ROOT / "assets" / "toy-sd"), help="base pipeline (folder or hub id)")
    p.add_argument("--unet", nargs="+", required=True,
                   help="erased U-Nets, each a diffusers folder, an erasure .safetensors file or a training checkpoint "
                        "folder (checkpoint-N: SDD's EMA teacher, ESD's student at that step)")
    p.add_argument("--with_checkpoints", action="store_true",
                   help="also measure the checkpoint-N folders of each --unet's run (OUT/unet, OUT/erasure.safetensors "
                        "or OUT), oldest first, up to the run's last step")
    p.add_argument("--concept", default="red", help="the erased concept c (as the trainer's --removing_concepts)")
    p.add_argument("--prompts", nargs="+", default=None,
                   help="prompts whose base-model samples become the latents (default: the toy's 'a {colour} "
                        "circle' for every colour)")
    p.add_argument("--keep_prompts", nargs="+", default=None,
                   help="prompts the erasure should leave alone (default: the toy's 'a {colour} circle' for every "
                        "colour but --concept)")
    p.add_argument("--timesteps", type=int, nargs="+", default=None,
                   help="noise levels t (default: 10/30/50/70/90%% of the scheduler's num_train_timesteps)")
    p.add_argument("--num_images", type=int, default=4, help="samples per prompt")
    p.add_argument("--num_inference_steps", type=int, default=M.DEFAULT_STEPS, help="DDIM steps of the base samples")
    p.add_argument("--guidance_scale", type=float, default=M.DEFAULT_GUIDANCE, help="CFG scale of the base samples")
    p.add_argument("--seed", type=int, default=0, help="seed of the samples and of the added noise")
    p.add_argument("--output", default=None, help="optional JSON file for the table")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda when available)")
    add_threads_arg(p)
    args = p.parse_args(argv)
    if args.num_images < 1 or args.num_inference_steps < 1:
        p.error("--num_images and --num_inference_steps must be at least 1")
    return args


def with_checkpoints(paths: Sequence[str]) -> list[str]:
    """Each path preceded by its run's checkpoint folders, oldest first, without the one that is the saved result."""
    out = []
    for p in paths:
        run = run_folder(p)
        steps = None
        if (run / "erasure.safetensors").is_file():
            steps = int(read_erasure(run / "erasure.safetensors")[1].get("num_train_steps", 0)) or None
        out += [str(c) for c in list_checkpoints(run) if steps is None or int(c.name.split("-")[1]) < steps]
        out.append(p)
    return list(dict.fromkeys(out))


def toy_circles(colours: Sequence[str]) -> list[str]:
    """'a {colour} circle' for each colour: the default prompts on the toy model."""
    return [f"a {c} circle" for c in colours]


def base_latents(pipe, prompts: Sequence[str], n: int, steps: int, guidance: float, seed: int) -> torch.Tensor:
    """The base pipeline's final latents for each prompt, n per prompt (image j of prompt i seeded seed + 1000 i + j)."""
    seeds = [seed + 1000 * i + j for i in range(len(prompts)) for j in range(n)]
    return torch.stack(M.sample_images(pipe, [p for p in prompts for _ in range(n)], seeds, num_inference_steps=steps,
                                       guidance_scale=guidance, output_type="latent"))


@torch.no_grad()
def drift_at(base, erased, scheduler, x0: torch.Tensor, t: int, emb: dict[str, torch.Tensor], concept: str,
             keep: Sequence[str], seed: int) -> dict[str, float]:
    """The four columns at noise level t, averaged over the latents x0."""
    noise = torch.randn(x0.shape, generator=torch.Generator("cpu").manual_seed(seed + t)).to(x0.device, x0.dtype)
    tt = torch.full((x0.shape[0],), t, device=x0.device, dtype=torch.long)
    z = scheduler.add_noise(x0, noise, tt)

    def eps(unet, prompt: str) -> torch.Tensor:
        return unet(z, tt, encoder_hidden_states=emb[prompt].expand(len(z), -1, -1)).sample.float().flatten(1)

    def size(x: torch.Tensor) -> torch.Tensor:
        return x.norm(dim=1)

    b0, bc, e0, ec = eps(base, ""), eps(base, concept), eps(erased, ""), eps(erased, concept)
    gap = size(bc - b0).clamp_min(1e-12)
    kept = (torch.stack([size(eps(erased, p) - eps(base, p)) for p in keep]).mean(0) if keep
            else torch.full_like(gap, float("nan")))
    cols = {"uncond": size(e0 - b0), "concept": size(ec - bc), "kept": kept, "gap": size(ec - e0)}
    return {k: float((v / gap).mean()) for k, v in cols.items()}


def mean_row(rows: dict[int, dict[str, float]]) -> dict[str, float]:
    """The columns averaged over the timesteps."""
    return {c: sum(r[c] for r in rows.values()) / len(rows) for c in COLUMNS}


def format_table(rows: dict, first: str) -> str:
    """Text table: one row per key (timestep or U-Net), columns as in the module docstring."""
    width = max([len(first)] + [len(str(k)) for k in rows])
    lines = [f"{first:<{width}} " + " ".join(f"{c + (' left' if c == 'gap' else ' drift'):>14}" for c in COLUMNS)]
    lines += [f"{str(k):<{width}} " + " ".join(f"{r[c]:>14.2f}" for c in COLUMNS) for k, r in rows.items()]
    return "\n".join(lines)


def main(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    missing = [u for u in args.unet if not Path(u).exists()]
    if missing:
        raise UserError(f"--unet {' '.join(missing)} does not exist")
    device = resolve_device(args.device)
    apply_threads(args.threads, device)
    pipe = M.load_pipeline(args.model, None, str(device))
    prompts = args.prompts or toy_circles(COLOURS)
    keep = args.keep_prompts if args.keep_prompts is not None else toy_circles([c for c in COLOURS if c != args.concept])
    total = pipe.scheduler.config.num_train_timesteps
    timesteps = args.timesteps or [round(f * total) for f in FRACTIONS]
    bad = [t for t in timesteps if not 0 <= t < total]
    if bad:
        raise UserError(f"--timesteps {bad} outside 0..{total - 1} (the scheduler's num_train_timesteps)")
    x0 = base_latents(pipe, prompts, args.num_images, args.num_inference_steps, args.guidance_scale, args.seed)
    texts = list(dict.fromkeys(["", args.concept, *keep]))
    emb = dict(zip(texts, FAMILIES["sd"].encode_hidden(pipe.tokenizer, pipe.text_encoder, texts, device).to(x0.dtype).unsqueeze(1)))
    cos = torch.nn.functional.cosine_similarity(emb[args.concept][0].float(), emb[""][0].float(), dim=-1)
    shared = int((cos >= SHARED_COS).sum())
    print(f"{shared} of {len(cos)} token positions of {args.concept!r} encode within cosine {SHARED_COS} of the empty "
          f"prompt's (per position: {' '.join(f'{c:.2f}' for c in cos.tolist())})")
    res, summary = {}, {}
    for path in with_checkpoints(args.unet) if args.with_checkpoints else args.unet:
        erased = copy.deepcopy(pipe.unet)
        load_unet_into(erased, path)
        res[path] = {t: drift_at(pipe.unet, erased, pipe.scheduler, x0, t, emb, args.concept, keep, args.seed)
                     for t in timesteps}
        summary[path] = mean_row(res[path])
        print(f"\n{path}, concept {args.concept!r}, relative to the base gap ||eps(c) - eps('')||:")
        print(format_table({**res[path], "mean": summary[path]}, "t"), flush=True)
    print("\nmeans over t:\n" + format_table(summary, "U-Net"), flush=True)
    if args.output:
        write_json(Path(args.output), {"settings": vars(args), "timesteps": timesteps, "shared_positions": shared,
                                       "rows": {p: {str(t): r for t, r in rows.items()} for p, rows in res.items()},
                                       "mean": summary})
    return summary


if __name__ == "__main__":
    run(main, parse_args)
