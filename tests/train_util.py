"""Helpers shared by the training tests: the tiny runs' flags and what a run changed."""
from __future__ import annotations

from pathlib import Path

import torch
from diffusers import UNet2DConditionModel

import train_esd
import train_sdd

FAST = ["--num_train_steps", "3", "--num_ddim_steps", "4", "--device", "cpu"]


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
