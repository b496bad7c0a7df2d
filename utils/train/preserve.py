"""Preservation, beyond the papers (--preserve_prompts, --preserve_weight, --preserve_batch; both trainers).

Neither SDD nor ESD looks at the prompts it should leave alone. With a preserve list P this term is added to the
method's loss each micro-step:
    lambda * mean_{p in P_step} || e_student(z_t, t, c_p) - e_original(z_t, t, c_p) ||^2,
on the step's own z_t and t, where e_original is the trained subset's frozen starting values (utils.train.loop.Setup
.original: the one snapshot ESD's target also uses). P_step is the whole list, or with --preserve_batch N the next N
prompts of the list, cycling (step s uses prompts sN .. sN + N - 1, modulo the list's length; the same on resume).
It is one batched forward of the original view (no gradient) and one of the student over len(P_step) x B samples.
At step 0 the student is the original and the term is exactly 0; it pulls the student back toward the original on
the preserve prompts. Off (no list, or lambda 0) nothing of it runs.
"""
from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Sequence

import torch

from utils.cli import UserError
from utils.families import Cond, Family
from utils.text import read_word_list

if TYPE_CHECKING:
    from utils.train.loop import Batch


def add_preserve_args(p: argparse.ArgumentParser) -> None:
    """The preservation flags (a group of the shared training flags)."""
    g = p.add_argument_group("preservation (beyond the papers; utils/train/preserve.py)")
    g.add_argument("--preserve_prompts", nargs="+", default=None, metavar="PROMPT",
                   help="prompts (or one .txt file, one a line) whose noise estimates are pulled back to the original "
                        "model's on the step's z_t; off when unset")
    g.add_argument("--preserve_weight", type=float, default=None, metavar="LAMBDA",
                   help="lambda: weight of the preservation term (needs --preserve_prompts; 0: off)")
    g.add_argument("--preserve_batch", type=int, default=None, metavar="N",
                   help="preserve prompts per step: the next N of the list, cycling (unset: all of them every step)")


def read_preserve_prompts(args: argparse.Namespace) -> list[str]:
    """The preserve prompts as read ([] when off); UserError for an inconsistent combination of the flags."""
    prompts, weight, n = args.preserve_prompts, args.preserve_weight, args.preserve_batch
    if prompts is None:
        if weight is not None or n is not None:
            raise UserError("--preserve_weight and --preserve_batch need --preserve_prompts")
        return []
    if weight is None:
        raise UserError("--preserve_prompts needs --preserve_weight LAMBDA (the term's weight)")
    if weight < 0:
        raise UserError(f"--preserve_weight must be >= 0, got {weight}")
    if n is not None and n < 1:
        raise UserError(f"--preserve_batch must be >= 1, got {n}")
    return read_word_list(prompts, "preserve prompts (--preserve_prompts)")


class Preservation:
    """lambda * mean || e_student(z_t, c_p) - e_original(z_t, c_p) ||^2 over a step's preserve prompts."""

    def __init__(self, family: Family, prompts: Sequence[str], embeds: dict[str, Cond], original: dict,
                 weight: float, per_step: int | None) -> None:
        self.family, self.prompts, self.original, self.weight = family, list(prompts), original, weight
        self.per_step = min(per_step or len(self.prompts), len(self.prompts))
        self.conds = [embeds[p] for p in self.prompts]
        self.last = 0.0  # the last term, for the log

    def step_prompts(self, step: int) -> list[int]:
        """Indices of the prompts used at optimizer step `step`: all, or the next --preserve_batch, cycling."""
        start, n = step * self.per_step, len(self.prompts)
        return [(start + i) % n for i in range(self.per_step)]

    def loss(self, unet: torch.nn.Module, b: "Batch", step: int) -> torch.Tensor:
        """The weighted term on the batch's z_t and t (student first: see SDD.loss on autocast's weight cache)."""
        idx = self.step_prompts(step)
        n, m = len(b.z), len(idx)
        cond = Cond.cat([self.conds[i].expand(n) for i in idx])
        z = b.z.repeat(m, *[1] * (b.z.ndim - 1))
        t = b.t.repeat(m) if b.t.ndim else b.t
        e_s = self.family.predict(unet, None, z, t, cond)
        with torch.no_grad():
            e_o = self.family.predict(unet, self.original, z, t, cond)
        err = (e_s.float() - e_o.float()) ** 2
        if b.weight is not None:  # --loss_space epsilon: the same per-sample weights as the method's loss
            err = b.weight.repeat(m, *[1] * (b.weight.ndim - 1)) * err
        term = self.weight * torch.mean(err)
        self.last = term.item()
        return term
