"""Erasure measured on the shipped toy model: "a red" goes, the other colours and the shapes stay."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

import train_esd
from utils.toy import load_pipeline, measure

ROOT = Path(__file__).resolve().parents[1]
TOY = ROOT / "assets" / "toy-sd"


@pytest.mark.skipif(not (TOY / "model_index.json").exists(), reason="assets/toy-sd not present")
def test_esd_erases_red_and_keeps_the_other_colours(tmp_path):
    threads = torch.get_num_threads()
    try:
        out = train_esd.main(train_esd.parse_args([
            "--pretrained_model_name_or_path", str(TOY), "--removing_concepts", "a red", "--num_train_steps", "160",
            "--train_batch_size", "4", "--learning_rate", "1e-4", "--num_ddim_steps", "20", "--guidance_scale", "3",
            "--checkpointing_steps", "1000", "--seed", "0", "--device", "cpu", "--output_dir", str(tmp_path / "esd")]))
        before = measure(load_pipeline(TOY), n_per_prompt=6, seed=7, colours=["red", "green", "blue"], shapes=["circle"])
        after = measure(load_pipeline(TOY, out / "unet"), n_per_prompt=6, seed=7, colours=["red", "green", "blue"],
                        shapes=["circle"])
    finally:
        torch.set_num_threads(threads)
    assert before["colour_rate"]["red"] >= 0.8
    assert after["colour_rate"]["red"] <= before["colour_rate"]["red"] - 0.5
    assert after["colour_rate"]["green"] >= 0.8 and after["colour_rate"]["blue"] >= 0.8
    assert after["shape_acc"] >= 0.8
