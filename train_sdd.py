"""SDD: Safe self-Distillation of Diffusion models (Kim et al., 2023).

The student learns to give the removal concept c_s the same noise estimate as the empty prompt,
    L = || sg(e_student(z_t, t, c_0)) - e_student(z_t, t, c_s) ||^2,
on z_t drawn by k guided DDIM steps of an EMA teacher; the teacher (m = 0.999) is the result. With several
concepts the paper samples z_t with the step's concept c_p and removes all of them joined (c_s); the reference
code does the opposite (--sampling_concept all --removal_target current). Beyond the paper, --uncond_from teacher
or original computes the target e(z_t, t, c_0) with the EMA teacher or the frozen starting weights instead.

    python train_sdd.py --removing_concepts nudity --output_dir outputs/sdd-nudity
"""
from __future__ import annotations

import argparse
from typing import Mapping, Sequence

import torch

from utils.cli import ArgumentParser, HelpFormatter, run
from utils.cli import UserError
from utils.train.args import add_training_args
from utils.train.concepts import REMOVAL_TARGETS, SAMPLING_CONCEPTS, step_prompts
from utils.train.loop import Batch, Setup, output_mse, train
from utils.train.views import snapshot


UNCOND_FROM = {"student": "the student's own weights (the paper; also when unset)",
               "teacher": "the EMA teacher", "original": "a frozen copy of the trained subset's starting values"}


class SDD:
    """EMA teacher samples z_t; the student's c_s estimate is pulled to its own unconditional one (--uncond_from)."""

    name = "sdd"
    neutral_flags = frozenset({"eval_with"})

    @classmethod
    def check(cls, args: argparse.Namespace, concepts: list[str]) -> None:
        """m must be a weight in [0, 1]; --uncond_from one of UNCOND_FROM (or unset: the student)."""
        if not 0 <= args.ema_decay <= 1:
            raise UserError(f"--ema_decay must be in [0, 1], got {args.ema_decay}")
        if args.uncond_from not in (None, *UNCOND_FROM):
            raise UserError(f"--uncond_from must be one of {', '.join(UNCOND_FROM)}, got {args.uncond_from}")

    def __init__(self, setup: Setup) -> None:
        self.family, self.concepts = setup.family, setup.concepts
        self.student = setup.subset
        self.teacher = snapshot(setup.subset)  # EMA copies of the trained tensors only
        self.sampler = self.result = self.teacher
        self.decay = setup.args.ema_decay
        self.eval_with = setup.args.eval_with
        self.sampling, self.removal = setup.args.sampling_concept, setup.args.removal_target
        # the weights of the target e(z_t, c_0): None = the live student; the original is copied only when asked
        uncond = setup.args.uncond_from or "student"
        self.uncond = None if uncond == "student" else self.teacher if uncond == "teacher" else setup.original()

    def prompts(self, c_p: str) -> tuple[str, str]:
        """z_t from c_p's trajectory and c_s = all concepts joined (Alg. 1), or as --sampling_concept/--removal_target say."""
        return step_prompts(c_p, self.concepts, self.sampling, self.removal)

    def loss(self, unet: torch.nn.Module, b: Batch) -> torch.Tensor:
        """mean((sg(e_0) - e_s)^2), e_0 = student(z_t, t, c_0) (--uncond_from: the teacher's or original's),
        e_s = student(z_t, t, c_s)."""
        # e_s first: under autocast, torch before 2.10 reuses the low-precision weight copies cast by the first pass,
        # and copies cast under no_grad would leave e_s without a gradient
        e_s = self.family.predict(unet, None, b.z, b.t, b.c_s.expand(len(b.z)))
        with torch.no_grad():
            e_0 = self.family.predict(unet, self.uncond, b.z, b.t, b.c_0.expand(len(b.z)))
        return output_mse(e_s, e_0, b)

    def after_step(self) -> None:
        """theta_teacher <- m theta_teacher + (1 - m) theta_student, one fused lerp over the trained tensors."""
        with torch.no_grad():
            names = list(self.teacher)
            torch._foreach_lerp_([self.teacher[n] for n in names], [self.student[n].detach() for n in names],
                                 1.0 - self.decay)

    def eval_views(self) -> dict:
        """Which weights validation samples with (--eval_with)."""
        views = {"teacher": self.teacher, "student": None}
        return views if self.eval_with == "both" else {self.eval_with: views[self.eval_with]}

    def state_dict(self) -> dict:
        """The EMA tensors (the student's are saved by the trainer)."""
        return dict(self.teacher)

    def load_state_dict(self, state: Mapping) -> None:
        """Restore the EMA tensors in place."""
        with torch.no_grad():
            for n, t in self.teacher.items():
                t.copy_(state[n])


def _choices(options: dict[str, str]) -> str:
    return "; ".join(f"'{k}' = {v}" for k, v in options.items())


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """SDD's flags: the shared ones plus the EMA, the sampling prompt and the removal target."""
    p = ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    add_training_args(p, num_train_steps=1500, weight_decay=1e-4, max_grad_norm=1.0, output_dir="outputs/sdd")
    g = p.add_argument_group("SDD")
    g.add_argument("--ema_decay", type=float, default=0.999, help="m: teacher <- m teacher + (1 - m) student")
    g.add_argument("--sampling_concept", choices=list(SAMPLING_CONCEPTS), default="current",
                   help="the prompt whose guided DDIM trajectory gives z_t: " + _choices(SAMPLING_CONCEPTS))
    g.add_argument("--removal_target", choices=list(REMOVAL_TARGETS), default="all",
                   help="c_s, the prompt pulled to the empty prompt's estimate: " + _choices(REMOVAL_TARGETS))
    g.add_argument("--uncond_from", choices=list(UNCOND_FROM), default=None,
                   help="the weights that compute the target e(z_t, c_0) (stop-gradient): " + _choices(UNCOND_FROM))
    g.add_argument("--eval_with", choices=["teacher", "student", "both"], default="teacher",
                   help="weights used for validation images")
    p.set_defaults(method="sdd")
    return p.parse_args(argv)


def main(args: argparse.Namespace):
    """Train and save OUTPUT_DIR/unet and OUTPUT_DIR/erasure.safetensors."""
    return train(args, SDD)


if __name__ == "__main__":
    run(main, parse_args)
