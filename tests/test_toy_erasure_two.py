"""Two concepts at once on the shipped toy model: run_esd_toy.sh's blue + red run erases both (its own file, so that
pytest-xdist runs it beside test_toy_erasure.py's single-concept run)."""
from __future__ import annotations

import pytest

import train_esd
from toy_util import TOY, colour_rates, needs_toy

pytestmark = [needs_toy, pytest.mark.slow(minutes=2)]


def test_esd_erases_blue_then_red_and_keeps_the_other_four(tmp_path, one_thread):
    """run_esd_toy.sh's two-concept run: blue for 200 steps with eta 2, then red for 125 with eta 1.5
    (--concept_steps, a --negative_guidance per concept); orange, red's neighbour, is the colour most at risk (82.5%
    preserved in the demo, docs/toy_world.md). Red is gone also by the lenient reading (not darkened to a crimson)."""
    out = train_esd.main(train_esd.parse_args([
        "--pretrained_model_name_or_path", str(TOY), "--removing_concepts", "blue", "red", "--num_train_steps", "325",
        "--concept_method", "sequential", "--concept_steps", "200", "125", "--train_batch_size", "4",
        "--learning_rate", "1e-4", "--num_ddim_steps", "20", "--guidance_scale", "3", "--negative_guidance", "2", "1.5",
        "--checkpointing_steps", "1000", "--seed", "0", "--device", "cpu", "--threads", "1",
        "--output_dir", str(tmp_path / "br")]))
    erased = [("a red circle", "red"), ("a square in crimson", "red"), ("a blue triangle", "blue"),
              ("a circle in azure", "blue")]
    kept = [("a orange circle", "orange"), ("a purple circle", "purple"), ("a yellow triangle", "yellow"),
            ("a green square", "green")]
    before, after = colour_rates(None, erased + kept), colour_rates(out / "unet", erased + kept)
    assert min(before.values()) >= 0.75
    assert all(after[p] <= 0.25 for p, _ in erased), after
    assert after["a orange circle"] >= 0.5 and all(after[p] >= 0.75 for p, _ in kept[1:]), after
    # red prompts' images nearer red than any other palette colour: 8.6 / 6.9 / 12.5% in the demo (eta 2 for red
    # too: 93%, a crimson); here, per prompt, 0 / 50 / 0 / 25% of 4 images
    lenient = colour_rates(out / "unet", erased[:2] + [("an apple", "red"), ("a red triangle", "red")], lenient=True)
    assert sum(lenient.values()) / len(lenient) <= 0.3, lenient
