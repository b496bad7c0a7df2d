"""Erasure measured on the shipped toy model: ESD with the demo's settings removes the word red, also from a held-out
phrasing and an object, while blue and green stay."""
from __future__ import annotations

from pathlib import Path

import pytest

import train_esd
from utils.toy import measure as M

ROOT = Path(__file__).resolve().parents[1]
TOY = ROOT / "assets" / "toy-sd"


@pytest.mark.skipif(not (TOY / "model_index.json").exists(), reason="assets/toy-sd not present")
def test_esd_erases_the_word_red_and_keeps_blue_and_green(tmp_path, one_thread):
    out = train_esd.main(train_esd.parse_args([
        "--pretrained_model_name_or_path", str(TOY), "--removing_concepts", "red", "--num_train_steps", "40",
        "--train_batch_size", "4", "--learning_rate", "1e-4", "--num_ddim_steps", "20", "--guidance_scale", "3",
        "--negative_guidance", "1", "--checkpointing_steps", "1000", "--seed", "0", "--device", "cpu",
        "--threads", "1", "--output_dir", str(tmp_path / "esd")]))
    prompts = [("a red circle", "red"), ("red square", "red"), ("a circle in crimson", "red"), ("an apple", "red"),
               ("a blue triangle", "blue"), ("a green square", "green")]
    items = [M.Item(p, M.image_seed(p, j, 7), "", c, None) for p, c in prompts for j in range(4)]
    before = M.draw(M.load_pipeline(TOY), items)
    after = M.draw(M.load_pipeline(TOY, out / "unet"), items)
    from utils.toy import judge

    def rate(images, colour, prompts_of):
        shown = [judge(im)[0] == colour for it, im in zip(items, images) if it.prompt in prompts_of]
        return sum(shown) / len(shown)

    red_named, red_unseen = {"a red circle", "red square"}, {"a circle in crimson", "an apple"}
    assert rate(before, "red", red_named | red_unseen) >= 0.9
    assert rate(after, "red", red_named) <= 0.25
    assert rate(after, "red", red_unseen) <= 0.25  # a held-out phrasing and an object lose red too
    assert rate(after, "blue", {"a blue triangle"}) >= 0.75 and rate(after, "green", {"a green square"}) >= 0.75
