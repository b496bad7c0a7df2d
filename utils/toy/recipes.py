"""The toy table's rows: what each method is and the flags it runs with, readable at a glance (utils/toy/table.py
runs them; docs/toy_table.md explains the scaling)."""
from __future__ import annotations

import re
from typing import Sequence

from utils.toy import measure

CONCEPT = "red"  # the erased word; multi-concept rows add MULTI
MULTI = ("red", "blue")
NEIGHBOUR = measure.NEIGHBOURS[CONCEPT]  # orange

# ---------------------------------------------------------------------------------------------- the settings
# Fine-tuned rows scale each paper's recipe to the toy the same way: steps / 5, learning rate x 10 (1e-5 -> 1e-4),
# batch 1 -> 4, N = 50 -> 20 DDIM steps, SDD's EMA horizon 1 / (1 - m) = 1000 -> 200 steps (m 0.999 -> 0.995);
# s_g 3, eta and the trained layers as in the papers; AdamW, weight decay 1e-4, clip 1 (the trainers' defaults).
# A row is (runner, flags): "generate" = a generate.py mode on the base model (--safety_concept red); "esd" / "sdd" =
# that trainer with TOY_TRAIN and the row's flags (removing_concepts defaults to CONCEPT).
TOY_TRAIN = {"learning_rate": 1e-4, "train_batch_size": 4, "num_ddim_steps": 20, "guidance_scale": 3.0}
METHODS: dict[str, tuple[str, dict]] = {
    "SD": ("generate", {}),
    "SD+NEG": ("generate", {"pipeline_type": "sd", "pipeline_config": "neg"}),
    "SLD-weak": ("generate", {"pipeline_type": "sld", "pipeline_config": "weak"}),
    "SLD-medium": ("generate", {"pipeline_type": "sld", "pipeline_config": "medium"}),
    "SLD-strong": ("generate", {"pipeline_type": "sld", "pipeline_config": "strong"}),
    "SLD-max": ("generate", {"pipeline_type": "sld", "pipeline_config": "max"}),
    "SEGA": ("generate", {"pipeline_type": "sega"}),
    "ESD-u-1": ("esd", {"finetuning_method": "noxattn", "negative_guidance": 1.0, "num_train_steps": 200}),
    "ESD-x-1": ("esd", {"finetuning_method": "xattn", "negative_guidance": 1.0, "num_train_steps": 200}),
    "ESD-x-3": ("esd", {"finetuning_method": "xattn", "negative_guidance": 3.0, "num_train_steps": 200}),
    "SDD": ("sdd", {"finetuning_method": "xattn", "ema_decay": 0.995, "num_train_steps": 300}),
    "ESD-x-3 (red+blue)": ("esd", {"finetuning_method": "xattn", "negative_guidance": 3.0, "num_train_steps": 200,
                                   "removing_concepts": list(MULTI)}),
    "SDD (red+blue)": ("sdd", {"finetuning_method": "xattn", "ema_decay": 0.995, "num_train_steps": 300,
                               "removing_concepts": list(MULTI)}),
}
# the concept-inversion attack on every fine-tuned row (docs/attack.md's toy settings, but attack.py's own sampling
# defaults, guidance 7.5 and 25 steps: the published table was drawn so)
ATTACK = {"target_prompt": "prompts/attack_toy.txt", "prompts": "prompts/attack_toy.txt", "num_target_images": 24,
          "num_images_per_prompt": 16, "num_vectors": 4, "num_train_steps": 500, "learning_rate": 5e-3}
# --quick: these rows, QUICK_N images per prompt, training and attack steps x QUICK_STEPS (EMA horizon scaled alike)
QUICK = ("SD", "SD+NEG", "SLD-max", "ESD-x-3", "SDD")
QUICK_N = 2
QUICK_STEPS = 0.1
QUICK_ATTACK = {"num_target_images": 8, "num_images_per_prompt": 2}


def slug(name: str) -> str:
    """A method's folder name: 'ESD-x-3 (red+blue)' -> 'esd-x-3-red-blue'."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def argv_of(flags: dict) -> list[str]:
    """{'a_b': 1, 'c': [x, y]} -> ['--a_b', '1', '--c', 'x', 'y']."""
    out: list[str] = []
    for k, v in flags.items():
        out += [f"--{k}", *map(str, v if isinstance(v, (list, tuple)) else [v])]
    return out


def recipe(name: str, quick: bool) -> dict:
    """A row's runner, concepts and flags as run (with --quick: steps and the EMA horizon x QUICK_STEPS)."""
    runner, flags = METHODS[name]
    flags = dict(flags)
    concepts = flags.pop("removing_concepts", [CONCEPT])
    if runner != "generate":
        flags = {**TOY_TRAIN, **flags}
        if quick:
            flags["num_train_steps"] = max(1, round(flags["num_train_steps"] * QUICK_STEPS))
            if "ema_decay" in flags:
                flags["ema_decay"] = round(1 - (1 - flags["ema_decay"]) / QUICK_STEPS, 6)
    return {"runner": runner, "concepts": concepts, "flags": flags}


def attack_flags(quick: bool) -> dict:
    """The attack's flags (--quick: fewer steps, targets and images)."""
    steps = max(1, round(ATTACK["num_train_steps"] * QUICK_STEPS))
    return {**ATTACK, **QUICK_ATTACK, "num_train_steps": steps} if quick else dict(ATTACK)


def settings_table(names: Sequence[str], quick: bool) -> list[dict]:
    """One row per fine-tuned method: trainer, concepts, layers, steps, lr, batch, N, s_g, eta, EMA."""
    recipes = {n: recipe(n, quick) for n in names}
    return [{"method": n, "trainer": f"train_{r['runner']}.py", "concepts": " ".join(r["concepts"]),
             "layers": f["finetuning_method"], "steps": f["num_train_steps"], "lr": f["learning_rate"],
             "batch": f["train_batch_size"], "N": f["num_ddim_steps"], "s_g": f["guidance_scale"],
             "eta": f.get("negative_guidance"), "EMA m": f.get("ema_decay")}
            for n, r in recipes.items() if r["runner"] != "generate" for f in [r["flags"]]]
