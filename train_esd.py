"""ESD: Erased Stable Diffusion (Gandikota et al., 2023), the baseline.

z_t is sampled by the model being trained (CFG s_g with the concept c); the frozen original model gives
e_0 = e*(z_t, t, "") and e_c = e*(z_t, t, c), and the student is trained towards the negatively guided target
    L = || e_student(z_t, t, c) - (e_0 - eta (e_c - e_0)) ||^2.
--finetuning_method xattn is ESD-x, noxattn is ESD-u. The defaults are the SDD paper's ESD baseline as its
reference code trains it: eta 3, AdamW (lr 1e-5, weight decay 1e-4), gradient norm clipped at 1.0, 1000 steps.
With several concepts, each may have its own eta (--negative_guidance 2 1.5: one value per concept, in order).

    python train_esd.py --removing_concepts nudity --output_dir outputs/esd-nudity
"""
from __future__ import annotations

import argparse
from typing import Mapping, Sequence

import torch

from utils.cli import ArgumentParser, HelpFormatter, run
from utils.cli import UserError
from utils.families import Cond
from utils.train.args import add_training_args
from utils.train.concepts import per_concept_problem, per_concept_value
from utils.train.loop import Batch, Setup, output_mse, train


class ESD:
    """The live student samples z_t; a frozen copy of the trained subset is the original model."""

    name = "esd"
    neutral_flags = frozenset()

    @classmethod
    def check(cls, args: argparse.Namespace, concepts: list[str]) -> None:
        """--negative_guidance: one eta, or one per concept with one concept a step."""
        if problem := per_concept_problem(args.negative_guidance, concepts, args.concept_method,
                                          "--negative_guidance"):
            raise UserError(problem)

    def __init__(self, setup: Setup) -> None:
        self.family = setup.family
        self.student = setup.subset
        self.original = setup.original()  # frozen starting values of the trained tensors only
        self.sampler = None
        self.result = self.student
        self.etas, self.concepts = setup.args.negative_guidance, setup.concepts  # one eta, or one per concept

    def prompts(self, c_p: str) -> tuple[str, str]:
        """z_t is sampled with the step's concept c, and c is the prompt trained."""
        return c_p, c_p

    def loss(self, unet: torch.nn.Module, b: Batch) -> torch.Tensor:
        """mean((e_student(z, t, c) - (e_0 - eta (e_c - e_0)))^2), e_0 and e_c from the frozen original."""
        n, eta = len(b.z), per_concept_value(self.etas, self.concepts, b.concept)
        with torch.no_grad():
            cond = Cond.cat([b.c_0.expand(n), b.c_p.expand(n)])
            t = b.t.repeat(2) if b.t.ndim else b.t
            e_0, e_c = self.family.predict(unet, self.original, torch.cat([b.z, b.z]), t, cond).chunk(2)
            target = e_0.float() - eta * (e_c.float() - e_0.float())
        e_s = self.family.predict(unet, None, b.z, b.t, b.c_p.expand(n))
        return output_mse(e_s, target, b)

    def after_step(self) -> None:
        """Nothing: the original stays frozen."""

    def eval_views(self) -> dict:
        """Validation samples with the student, which is the result."""
        return {"student": None}

    def state_dict(self) -> dict:
        """Nothing beyond the student: the original is the base model's own subset."""
        return {}

    def load_state_dict(self, state: Mapping) -> None:
        """Nothing to restore."""


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """ESD's flags: the shared ones (the reference's optimizer settings) plus eta."""
    p = ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    add_training_args(p, num_train_steps=1000, weight_decay=1e-4, max_grad_norm=1.0, output_dir="outputs/esd")
    g = p.add_argument_group("ESD")
    g.add_argument("--negative_guidance", "--concept_scale", type=float, nargs="+", default=[3.0], metavar="ETA",
                   help="eta: strength of the negative guidance, one value or one per concept in --removing_concepts "
                        "order (3: the SDD paper's ESD-x-3 / ESD-u-3 baselines); --concept_scale is the reference "
                        "code's name")
    p.set_defaults(method="esd")
    return p.parse_args(argv)


def main(args: argparse.Namespace):
    """Train and save OUTPUT_DIR/unet and OUTPUT_DIR/erasure.safetensors."""
    return train(args, ESD)


if __name__ == "__main__":
    run(main, parse_args)
