"""Running commands as after the README's install: only the packages that requirements.txt brings can be imported
(tests/core_only/sitecustomize.py hides the others)."""
from __future__ import annotations

import importlib.metadata as md
import os
import re
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
CORE_ONLY = Path(__file__).resolve().parent / "core_only"


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def core_distributions() -> set[str]:
    """requirements.txt's distributions and everything they require (markers evaluated here, no extras)."""
    todo = [Requirement(line.split("#")[0].strip()) for line in (ROOT / "requirements.txt").read_text().splitlines()
            if line.split("#")[0].strip()]
    seen: set[str] = set()
    while todo:
        req = todo.pop()
        name = _norm(req.name)
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = md.distribution(req.name).requires or []
        except md.PackageNotFoundError:
            continue
        todo += [r for r in map(Requirement, requires) if r.marker is None or r.marker.evaluate({"extra": ""})]
    return seen


def hidden_modules() -> list[str]:
    """Top-level modules of the installed distributions that requirements.txt does not bring."""
    core = core_distributions()
    return sorted(mod for mod, dists in md.packages_distributions().items()
                  if mod.isidentifier() and not any(_norm(d) in core for d in dists))


def core_only_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """`base` (os.environ) for a subprocess in which only requirements.txt's packages import: core_only/ first on
    PYTHONPATH, then the repository; offline."""
    base = dict(os.environ if base is None else base)
    return {**base, "PYTHONPATH": os.pathsep.join([str(CORE_ONLY), str(ROOT)]),
            "SDD_TEST_BLOCKED_MODULES": ",".join(hidden_modules()), "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": ""}
