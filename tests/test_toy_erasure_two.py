"""Two concepts at once on the shipped toy model: run_esd_toy.sh's red + blue run erases both (its own file, so that
pytest-xdist runs it beside test_toy_erasure.py's single-concept run)."""
from __future__ import annotations

import pytest

import train_esd
from test_toy_erasure import TOY, colour_rates

pytestmark = pytest.mark.skipif(not (TOY / "model_index.json").exists(), reason="assets/toy-sd not present")


def test_esd_erases_red_and_blue_one_after_the_other_and_keeps_purple_yellow_green(tmp_path, one_thread):
    """run_esd_toy.sh's red + blue run: red for 165 steps, then blue for 165 (--concept_method sequential); orange,
    red's neighbour, is lost on this model (docs/toy_world.md), so it is not asserted."""
    out = train_esd.main(train_esd.parse_args([
        "--pretrained_model_name_or_path", str(TOY), "--removing_concepts", "red", "blue", "--num_train_steps", "330",
        "--concept_method", "sequential", "--train_batch_size", "4", "--learning_rate", "1e-4", "--num_ddim_steps",
        "20", "--guidance_scale", "3", "--negative_guidance", "1", "--checkpointing_steps", "1000", "--seed", "0",
        "--device", "cpu", "--threads", "1", "--output_dir", str(tmp_path / "rb")]))
    erased = [("a red circle", "red"), ("a square in crimson", "red"), ("a blue triangle", "blue"),
              ("a circle in azure", "blue")]
    kept = [("a purple circle", "purple"), ("a yellow triangle", "yellow"), ("a green square", "green")]
    before, after = colour_rates(None, erased + kept), colour_rates(out / "unet", erased + kept)
    assert min(before.values()) >= 0.75
    assert all(after[p] <= 0.25 for p, _ in erased), after
    assert all(after[p] >= 0.75 for p, _ in kept), after
