"""Erasure measured on the shipped toy model: ESD with the demo's settings removes the word red, also from a held-out
phrasing and an object, while blue and green stay; and the target-drift diagnostic on that run and its checkpoint."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

import train_esd
from toy_util import TOY, colour_rates, needs_toy

pytestmark = [needs_toy, pytest.mark.slow(minutes=1)]


@pytest.fixture(scope="module")
def esd_run(tmp_path_factory, one_thread) -> Path:
    """run_esd_toy.sh's training (150 steps), with a checkpoint at step 75 and at the end."""
    return train_esd.main(train_esd.parse_args([
        "--pretrained_model_name_or_path", str(TOY), "--removing_concepts", "red", "--num_train_steps", "150",
        "--train_batch_size", "4", "--learning_rate", "1e-4", "--num_ddim_steps", "20", "--guidance_scale", "3",
        "--negative_guidance", "2", "--checkpointing_steps", "75", "--seed", "0", "--device", "cpu",
        "--threads", "1", "--output_dir", str(tmp_path_factory.mktemp("esd") / "esd")]))


def test_esd_erases_the_word_red_and_keeps_blue_and_green(esd_run, one_thread):
    prompts = [("a red circle", "red"), ("red square", "red"), ("a circle in crimson", "red"), ("an apple", "red"),
               ("a blue triangle", "blue"), ("a green square", "green")]
    before, after = colour_rates(None, prompts), colour_rates(esd_run / "unet", prompts)
    assert sum(before[p] for p, c in prompts if c == "red") >= 4 * 0.9 and min(before.values()) >= 0.75
    assert after["a red circle"] + after["red square"] <= 0.5  # at most a quarter of the named prompts' images
    assert after["a circle in crimson"] + after["an apple"] <= 0.5  # a held-out phrasing and an object lose red too
    assert after["a blue triangle"] >= 0.75 and after["a green square"] >= 0.75


def test_target_drift_on_the_esd_run_and_its_checkpoints(esd_run, tmp_path, one_thread):
    """The base U-Net against itself moves nothing; ESD moves red's estimate more than the empty prompt's and the
    other colours'; --with_checkpoints puts the run's earlier checkpoint first; the checkpoint at the last step is
    the saved U-Net; a timestep out of range is refused."""
    from benchmarks import target_drift
    from utils.cli import UserError

    assert sorted(p.name for p in esd_run.glob("checkpoint-*")) == ["checkpoint-150", "checkpoint-75"]
    small = ["--num_images", "1", "--num_inference_steps", "4", "--threads", "1"]
    flags = [*small, "--timesteps", "300", "700"]
    units = [str(TOY / "unet"), str(esd_run / "checkpoint-150"), str(esd_run / "unet")]
    res = target_drift.main(target_drift.parse_args(["--unet", *units, "--with_checkpoints", "--output",
                                                     str(tmp_path / "d.json"), *flags]))
    assert list(res) == [*units[:2], str(esd_run / "checkpoint-75"), units[2]]  # the run's checkpoints before it
    same, step150, step75, final = res.values()
    assert same["uncond"] == same["concept"] == same["kept"] == 0 and same["gap"] == pytest.approx(1)
    assert step150 == pytest.approx(final, abs=1e-6)
    assert final["concept"] > 2 * max(final["uncond"], final["kept"])
    assert 0 < step75["concept"] != final["concept"]
    assert 0 < json.loads((tmp_path / "d.json").read_text())["shared_positions"] < 16
    with pytest.raises(UserError, match="--unet .*nope does not exist"):
        target_drift.main(target_drift.parse_args(["--unet", str(tmp_path / "nope"), *flags]))
    with pytest.raises(UserError, match="outside 0..999"):
        target_drift.main(target_drift.parse_args(["--unet", units[0], *small, "--timesteps", "1000"]))
