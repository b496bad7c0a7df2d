"""Is the toy model's empty-prompt colour bias in the model or its sampler? Answer: docs/notes/toy_models.md.

The empty prompt's colour mix of a toy model under several samplers: is a bias in the model or in the sampler?

SDD erases towards the model's own unconditional estimate, so what the empty prompt draws is the target an erased
colour drifts to. This draws --n images of the empty prompt with each sampler from the same initial latents (the
seeds of `python -m utils.toy quality`'s empty prompt, so its `ddim` row is that command's "empty prompt draws" line)
and judges their colours. When a stochastic sampler (DDIM eta 1, DDPM) or a finer step schedule shows the same mix
as the default, the bias is in the learned unconditional estimate, not in how it is sampled.

    python -m experiments.empty_mix --model assets/toy-sd --output outputs/empty_mix.json
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Sequence

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from utils.cli import ArgumentParser, HelpFormatter, add_threads_arg, apply_threads, run  # noqa: E402
from utils.eval.common import write_json  # noqa: E402
from utils.toy import measure as M  # noqa: E402
from utils.toy.judge import judge  # noqa: E402

# sampler name -> (scheduler class, extra scheduler config, extra pipeline call arguments)
SAMPLERS = {
    "ddim": ("DDIMScheduler", {}, {}),  # the model's own scheduler, as every toy number is measured
    "ddim-eta1": ("DDIMScheduler", {}, {"eta": 1.0}),  # DDIM with fresh noise at every step
    "ddim-trailing": ("DDIMScheduler", {"timestep_spacing": "trailing"}, {}),  # first step at t = T - 1
    "ddpm": ("DDPMScheduler", {}, {}),  # ancestral sampling, with --ddpm_steps
}


def bounded_ddim() -> type:
    """DDIM whose eta > 0 step variance stays below 1 - alpha_bar_prev: at zero terminal SNR (alpha_bar = 0 at
    t = T - 1) diffusers' sqrt(1 - alpha_bar_prev - sigma^2) is the root of a rounding-negative zero, NaN."""
    from diffusers import DDIMScheduler

    class BoundedDDIM(DDIMScheduler):
        def _get_variance(self, timestep, prev_timestep):
            prev = self.alphas_cumprod[prev_timestep] if prev_timestep >= 0 else self.final_alpha_cumprod
            return torch.minimum(super()._get_variance(timestep, prev_timestep), (1 - prev) * (1 - 1e-6))

    return BoundedDDIM


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--model", default=str(ROOT / "assets" / "toy-sd"), help="toy pipeline folder")
    p.add_argument("--unet", default=None, help="optional U-Net folder or erasure file replacing the pipeline's")
    p.add_argument("--samplers", nargs="+", choices=list(SAMPLERS), default=list(SAMPLERS), help="samplers to compare")
    p.add_argument("--n", type=int, default=120, help="images of the empty prompt per sampler")
    p.add_argument("--seed", type=int, default=0, help="measurement seed (as utils.toy quality's --seed)")
    p.add_argument("--steps", type=int, default=M.DEFAULT_STEPS, help="denoising steps of the DDIM samplers")
    p.add_argument("--ddpm_steps", type=int, default=100, help="denoising steps of the DDPM sampler")
    p.add_argument("--guidance_scale", type=float, default=M.DEFAULT_GUIDANCE,
                   help="CFG scale; on the empty prompt it changes nothing but the batch (utils.toy quality's value)")
    p.add_argument("--batch_size", type=int, default=64, help="images per pipeline call")
    p.add_argument("--output", default=None, help="optional JSON file for the mixes")
    p.add_argument("--device", default="cpu", help="cpu, cuda, ...")
    add_threads_arg(p)
    args = p.parse_args(argv)
    for flag in ("n", "steps", "ddpm_steps", "batch_size"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag} must be at least 1")
    return args


def main(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    import diffusers

    apply_threads(args.threads, torch.device(args.device))
    pipe = M.load_pipeline(args.model, args.unet, args.device)
    own = pipe.scheduler.config
    seeds = [it.seed for it in M.empty_items(args.n, args.seed)]
    classes = {"DDIMScheduler": bounded_ddim(), "DDPMScheduler": diffusers.DDPMScheduler}
    res = {}
    for name in args.samplers:
        cls, config, call = SAMPLERS[name]
        pipe.scheduler = classes[cls].from_config(own, **config)
        steps = args.ddpm_steps if cls == "DDPMScheduler" else args.steps
        torch.manual_seed(args.seed)  # the stochastic samplers draw their step noise from the global generator
        images = M.sample_images(pipe, [""] * args.n, seeds, num_inference_steps=steps,
                                 guidance_scale=args.guidance_scale, batch_size=args.batch_size, desc=name, **call)
        res[name] = M.colour_mix([judge(im)[0] for im in images])
        print(f"{name:<14} ({steps:>3} steps) " + ", ".join(f"{c} {100 * v:.1f}" for c, v in res[name].items() if v),
              flush=True)
    if args.output:
        write_json(Path(args.output), {"settings": {k: v for k, v in vars(args).items()}, "mix": res})
    return res


if __name__ == "__main__":
    run(main, parse_args)
