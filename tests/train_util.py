"""Helpers shared by the training tests: the tiny runs' flags, what a run changed, and made-up erasure files."""
from __future__ import annotations

from pathlib import Path

import torch
from diffusers import UNet2DConditionModel

import train_esd
import train_sdd
from utils.families import FAMILIES
from utils.saving import save_erasure

# one torch thread: runs that are compared bit for bit must not differ in their thread counts
FAST = ["--num_train_steps", "3", "--num_ddim_steps", "4", "--device", "cpu", "--threads", "1"]


def sd_args(pipe, out, *extra):
    return train_sdd.parse_args(["--pretrained_model_name_or_path", str(pipe), "--output_dir", str(out),
                                 "--removing_concepts", "nudity", "red circle", *FAST, *extra])


def esd_args(pipe, out, *extra):
    return train_esd.parse_args(["--pretrained_model_name_or_path", str(pipe), "--output_dir", str(out),
                                 "--removing_concepts", "nudity", "red circle", *FAST, *extra])


def moved(base: Path, out: Path) -> set[str]:
    """Names of U-Net tensors that differ between the base pipeline and OUT/unet."""
    a = UNet2DConditionModel.from_pretrained(base / "unet").state_dict()
    b = UNet2DConditionModel.from_pretrained(out / "unet").state_dict()
    assert a.keys() == b.keys()
    return {k for k in a if not torch.equal(a[k], b[k])}


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    return UNet2DConditionModel.from_pretrained(out / "unet").state_dict()


def make_erasure(base: Path, out: Path, method: str = "xattn", seed: int = 1, biases: bool = False,
                 unet: UNet2DConditionModel | None = None) -> Path:
    """An erasure file whose `method` weights (and biases/norms if asked) are the base's plus noise."""
    unet = unet or UNet2DConditionModel.from_pretrained(base / "unet")
    out.parent.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    pick = FAMILIES["sd"].SUBSETS[method]
    with torch.no_grad():
        trained = {n: p + 0.05 * torch.randn(p.shape, generator=gen) for n, p in unet.named_parameters()
                   if pick(n) and (biases or n.endswith(".weight") and p.ndim > 1)}
    save_erasure(out, trained, {"base_model": str(base), "method": "esd", "finetuning_method": method,
                                "concepts": ["red circle"], "num_train_steps": 3})
    return out
