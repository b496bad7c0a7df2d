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


def concept_steps_problem(steps: Sequence[int], concepts: Sequence[str], method: str, num_steps: int) -> str | None:
    """Why per-concept step counts (--concept_steps) do not fit the run; None when they do."""
    if method != "sequential":
        return f"--concept_steps needs --concept_method sequential (got {method})"
    if len(steps) != len(concepts):
        return f"--concept_steps has {len(steps)} counts for {len(concepts)} concepts {list(concepts)}"
    if min(steps) < 1:
        return f"--concept_steps must each be >= 1, got {list(steps)}"
    if sum(steps) != num_steps:
        return (f"--concept_steps add up to {sum(steps)} but --num_train_steps is {num_steps}; "
                f"pass --num_train_steps {sum(steps)}")
    return None


def per_concept_problem(values: Sequence[float], concepts: Sequence[str], method: str, flag: str) -> str | None:
    """Why a flag's values (one for all concepts, or one per concept) do not fit the run; None when they do."""
    if len(values) == 1:
        return None
    if len(values) != len(concepts):
        return f"{flag} has {len(values)} values for {len(concepts)} concepts {list(concepts)}; give one, or one each"
    if method == "composite":
        return f"{flag} with one value per concept needs one concept a step (iterative, random or sequential), " \
               f"not --concept_method composite"
    return None


def per_concept_value(values: Sequence[float], concepts: Sequence[str], concept: str) -> float:
    """`concept`'s value when a flag has one per concept; the single value otherwise, and for a prompt that is no
    one concept (the joined string)."""
    return values[list(concepts).index(concept)] if len(values) > 1 and concept in concepts else values[0]


def concept_schedule(concepts: Sequence[str], method: str, num_steps: int, seed: int,
                     steps: Sequence[int] | None = None) -> list[str]:
    """c_p for every step: cycle through C, draw at random (seeded), use the joined string, or C one after another
    (`steps[i]` steps each when given, else num_steps split evenly)."""
    n = len(concepts)
    if steps and (problem := concept_steps_problem(steps, concepts, method, num_steps)):
        raise ValueError(problem)
    if method == "iterative":
        return [concepts[s % n] for s in range(num_steps)]
    if method == "random":
        rng = random.Random(seed)
        return [rng.choice(list(concepts)) for _ in range(num_steps)]
    if method == "composite":
        return [joined(concepts)] * num_steps
    if method == "sequential":
        edges = [-(-i * num_steps // n) for i in range(n + 1)]  # ceil(i * num_steps / n): the even split
        counts = steps or [b - a for a, b in zip(edges, edges[1:])]
        return [c for c, k in zip(concepts, counts) for _ in range(k)]
    raise ValueError(f"unknown concept method {method!r}; choose from {', '.join(CONCEPT_METHODS)}")


def step_prompts(c_p: str, concepts: Sequence[str], sampling: str = "current", removal: str = "all") -> tuple[str, str]:
    """(prompt that samples z_t, prompt that is removed) for a step whose concept is c_p."""
    pick = {"current": c_p, "all": joined(concepts)}
    if sampling not in pick or removal not in pick:
        raise ValueError(f"sampling and removal must each be 'current' or 'all', got {sampling!r}, {removal!r}")
    return pick[sampling], pick[removal]
