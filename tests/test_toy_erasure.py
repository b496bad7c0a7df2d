"""Erasure measured on the shipped toy model: ESD with the demo's settings removes the word red, also from a held-out
phrasing and an object, while blue and green stay (the target-drift study of the same run: experiments/tests)."""
from __future__ import annotations

from pathlib import Path

import pytest

from toy_util import colour_rates, esd_demo_run, needs_toy

pytestmark = [needs_toy, pytest.mark.slow(minutes=1)]


@pytest.fixture(scope="module")
def esd_run(tmp_path_factory, one_thread) -> Path:
    """run_esd_toy.sh's training (150 steps), with a checkpoint at step 75 and at the end."""
    return esd_demo_run(tmp_path_factory.mktemp("esd") / "esd")


def test_esd_erases_the_word_red_and_keeps_blue_and_green(esd_run, one_thread):
    prompts = [("a red circle", "red"), ("red square", "red"), ("a circle in crimson", "red"), ("an apple", "red"),
               ("a blue triangle", "blue"), ("a green square", "green")]
    before, after = colour_rates(None, prompts), colour_rates(esd_run / "unet", prompts)
    assert sum(before[p] for p, c in prompts if c == "red") >= 4 * 0.9 and min(before.values()) >= 0.75
    assert after["a red circle"] + after["red square"] <= 0.5  # at most a quarter of the named prompts' images
    assert after["a circle in crimson"] + after["an apple"] <= 0.5  # a held-out phrasing and an object lose red too
    assert after["a blue triangle"] >= 0.75 and after["a green square"] >= 0.75
