"""Which concept c_p each training step uses, and the removal target c_s."""
from __future__ import annotations

import random
from typing import Sequence

CONCEPT_METHODS = ("iterative", "random", "composite", "sequential")
# which prompt samples z_t and which one is removed: the step's concept c_p, or all concepts joined
SAMPLING_CONCEPTS = {"current": "the step's concept c_p (paper, Alg. 1)", "all": "all concepts joined (reference code)"}
REMOVAL_TARGETS = {"all": "all concepts joined (paper, Alg. 1)", "current": "the step's concept c_p (reference code)"}


def joined(concepts: Sequence[str]) -> str:
    """The composite prompt ", ".join(C) (SDD's c_s)."""
    return ", ".join(concepts)


def concept_schedule(concepts: Sequence[str], method: str, num_steps: int, seed: int,
                     steps: Sequence[int] | None = None) -> list[str]:
    """c_p for every step: cycle through C, draw at random (seeded), use the joined string, or C one after another
    (for `steps[i]` steps each when given, else num_steps split evenly)."""
    n = len(concepts)
    if steps:
        if method != "sequential" or len(steps) != n or sum(steps) != num_steps or min(steps) < 1:
            raise ValueError(f"steps {list(steps)} need the sequential method, one count >= 1 per concept ({n}) "
                             f"and the sum {num_steps}")
        return [c for c, k in zip(concepts, steps) for _ in range(k)]
    if method == "iterative":
        return [concepts[s % n] for s in range(num_steps)]
    if method == "random":
        rng = random.Random(seed)
        return [rng.choice(list(concepts)) for _ in range(num_steps)]
    if method == "composite":
        return [joined(concepts)] * num_steps
    if method == "sequential":
        return [concepts[min(s * n // max(num_steps, 1), n - 1)] for s in range(num_steps)]
    raise ValueError(f"unknown concept method {method!r}; choose from {', '.join(CONCEPT_METHODS)}")


def step_prompts(c_p: str, concepts: Sequence[str], sampling: str = "current", removal: str = "all") -> tuple[str, str]:
    """(prompt that samples z_t, prompt that is removed) for a step whose concept is c_p."""
    pick = {"current": c_p, "all": joined(concepts)}
    if sampling not in pick or removal not in pick:
        raise ValueError(f"sampling and removal must each be 'current' or 'all', got {sampling!r}, {removal!r}")
    return pick[sampling], pick[removal]
