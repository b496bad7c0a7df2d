"""Helpers shared by the erasure tests on the shipped toy model: where it is, and how often prompts show their colour."""
from __future__ import annotations

from pathlib import Path

import pytest

from utils.toy import judge, nearest_colour
from utils.toy import measure as M

ROOT = Path(__file__).resolve().parents[1]
TOY = ROOT / "assets" / "toy-sd"
needs_toy = pytest.mark.usefixtures("shipped_toy")  # conftest.py: a missing model fails the test, never skips it


def colour_rates(unet: Path | None, prompts: list[tuple[str, str]], n: int = 4,
                 lenient: bool = False) -> dict[str, float]:
    """For each prompt, the share of its n images (seeds fixed by the prompt) that the judge sees in its colour
    (lenient: whose colour is nearer that palette colour than any other, at any distance)."""
    images = M.draw(M.load_pipeline(TOY, unet), [M.Item(p, M.image_seed(p, j, 7), "", c, None)
                                                 for p, c in prompts for j in range(n)])
    read = nearest_colour if lenient else (lambda im: judge(im)[0])
    return {p: sum(read(im) == c for im in images[i * n:(i + 1) * n]) / n for i, (p, c) in enumerate(prompts)}


def esd_demo_run(out: Path) -> Path:
    """run_esd_toy.sh's training (150 steps, eta 2), with a checkpoint at step 75 and at the end, into `out`."""
    import train_esd

    return train_esd.main(train_esd.parse_args([
        "--pretrained_model_name_or_path", str(TOY), "--removing_concepts", "red", "--num_train_steps", "150",
        "--train_batch_size", "4", "--learning_rate", "1e-4", "--num_ddim_steps", "20", "--guidance_scale", "3",
        "--negative_guidance", "2", "--checkpointing_steps", "75", "--seed", "0", "--device", "cpu",
        "--threads", "1", "--output_dir", str(out)]))


def assert_conditioned_as_sdxl_family(folder: Path, prompts: list[str], condition, rows=None) -> None:
    """`condition(ids)` (the toy trainer's conditioning; rows: which of its outputs are each prompt's) gives the sdxl
    family's encode of `folder` for every prompt: hidden states, pooled embedding and time ids."""
    import torch

    from utils.families import FAMILIES

    family = FAMILIES["sdxl"]
    parts = family.load(str(folder))
    cond = family.encode(parts, prompts, torch.device("cpu"))
    ids = parts.tokenizer(prompts, padding="max_length", max_length=parts.tokenizer.model_max_length,
                          truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        got = condition(ids)
    for i, p in zip(rows if rows is not None else range(len(prompts)), prompts):
        assert torch.allclose(got["encoder_hidden_states"][i], cond[p].hidden[0], atol=1e-6)
        for k in ("text_embeds", "time_ids"):
            assert torch.allclose(got["added_cond_kwargs"][k][i], cond[p].extra[k][0], atol=1e-6)
