"""Tests of the toy world: rendering, judge, caption parsing, tokenizer, a few steps of training, the shipped model."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from utils import toy  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "assets" / "toy-sd"


def test_render_is_seeded_and_on_white():
    a = toy.render("red", "circle", np.random.default_rng(3))
    b = toy.render("red", "circle", np.random.default_rng(3))
    arr = np.asarray(a)
    assert a.size == (32, 32) and a.mode == "RGB"
    assert np.array_equal(arr, np.asarray(b))
    assert tuple(arr[0, 0]) == (255, 255, 255) or tuple(arr[-1, -1]) == (255, 255, 255)
    assert (arr.min(axis=-1) < 100).sum() > 50  # a real shape was drawn
    with pytest.raises(ValueError):
        toy.render("purple", "circle", np.random.default_rng(0))


def test_make_dataset_shapes_and_captions():
    images, captions = toy.make_dataset(60, seed=1)
    assert images.shape == (60, 32, 32, 3) and images.dtype == np.uint8
    assert len(captions) == 60
    assert all(c == toy.caption(*toy.parse_caption(c)) for c in captions)
    assert len(set(captions)) > 6  # both colour and shape vary
    images2, captions2 = toy.make_dataset(60, seed=1)
    assert captions == captions2 and np.array_equal(images, images2)


def test_judge_on_rendered_data():
    images, captions = toy.make_dataset(600, seed=7)
    colour_ok = shape_ok = 0
    for im, cap in zip(images, captions):
        c, s = toy.parse_caption(cap)
        jc, js = toy.judge(im)
        colour_ok += jc == c
        shape_ok += js == s
    assert colour_ok / len(images) >= 0.995
    assert shape_ok / len(images) >= 0.98


def test_judge_accepts_pil_and_returns_none_without_a_shape():
    rng = np.random.default_rng(0)
    for colour in toy.COLOURS:
        for shape in toy.SHAPES:
            assert toy.judge(toy.render(colour, shape, rng)) == (colour, shape)
    assert toy.judge(np.full((32, 32, 3), 255, np.uint8)) == (None, None)
    speck = np.full((32, 32, 3), 255, np.uint8)
    speck[10:12, 10:12] = (220, 30, 30)  # 4 pixels: no clear shape
    assert toy.judge(speck) == (None, None)
    bar = np.full((32, 32, 3), 255, np.uint8)
    bar[14:17, 2:30] = (30, 60, 220)  # a thin bar is blue but no clear shape
    assert toy.judge(bar) == ("blue", None)


def test_parse_caption():
    assert toy.parse_caption("a red circle") == ("red", "circle")
    assert toy.parse_caption("A Yellow triangle.") == ("yellow", "triangle")
    assert toy.parse_caption("a square") == (None, "square")
    assert toy.parse_caption("green") == ("green", None)
    assert toy.parse_caption("a photo of a dog") == (None, None)


def test_tokenizer_one_token_per_word(tmp_path):
    from utils.tokenizer import write_clip_tokenizer

    tok = write_clip_tokenizer(tmp_path, toy.TOY_WORDS, model_max_length=toy.MODEL_MAX_LENGTH)
    for word in toy.TOY_WORDS:
        ids = tok(word, add_special_tokens=False).input_ids
        assert len(ids) == 1, (word, ids)
    ids = tok("a blue square").input_ids
    assert len(ids) == 5 and ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert set(toy.TOY_WORDS) == {"a", *toy.COLOURS, *toy.SHAPES}


def test_few_steps_of_training_give_a_loadable_pipeline(tmp_path):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from utils.models import load_sd_parts

    from safetensors.torch import load_file

    flags = ["--n_images", "48", "--vae_steps", "2", "--unet_steps", "3", "--vae_batch_size", "4",
             "--unet_batch_size", "4", "--quiet"]
    out, again = tmp_path / "toy", tmp_path / "again"
    toy.main(toy.parse_args(["train", "--output_dir", str(out), *flags]))
    toy.main(toy.parse_args(["train", "--output_dir", str(again), *flags]))
    w1 = load_file(out / "unet" / "diffusion_pytorch_model.safetensors")
    w2 = load_file(again / "unet" / "diffusion_pytorch_model.safetensors")
    assert w1.keys() == w2.keys() and all(torch.equal(w1[k], w2[k]) for k in w1)  # seeded: same weights
    assert (out / "model_index.json").exists() and (out / "train_toy.log").exists()
    assert not (out / "checkpoints").exists()
    assert list((out / "unet").glob("*.safetensors"))
    pipe = StableDiffusionPipeline.from_pretrained(out, safety_checker=None, requires_safety_checker=False)
    assert isinstance(pipe.scheduler, DDIMScheduler)
    sc = pipe.scheduler.config
    assert (sc.beta_schedule, sc.beta_start, sc.beta_end, sc.num_train_timesteps) == ("scaled_linear", 0.00085, 0.012, 1000)
    assert not sc.clip_sample and not sc.set_alpha_to_one and sc.steps_offset == 1
    assert pipe.vae.config.scaling_factor != 0.18215  # set from the latents' std
    parts = load_sd_parts(str(out))
    assert parts.default_resolution == 32
    assert len(parts.tokenizer("a red circle").input_ids) == 5  # reloaded tokenizer: still one token per word
    pipe.set_progress_bar_config(disable=True)
    a = toy.sample_images(pipe, ["a red circle", "a blue square", "a red circle"], [5, 6, 5], num_inference_steps=2,
                          batch_size=2)
    b = toy.sample_images(pipe, ["a red circle"], [5], num_inference_steps=2, batch_size=1)
    assert [im.size for im in a] == [(32, 32)] * 3
    # same seed and prompt -> same image, whatever the batch it was drawn in
    assert np.abs(np.asarray(a[0], dtype=int) - np.asarray(a[2], dtype=int)).max() <= 1
    assert np.abs(np.asarray(a[0], dtype=int) - np.asarray(b[0], dtype=int)).max() <= 1


@pytest.mark.skipif(not (SHIPPED / "model_index.json").exists(), reason="assets/toy-sd not trained yet")
def test_shipped_base_model_draws_the_asked_colour():
    torch.set_num_threads(1)
    pipe = toy.load_pipeline(SHIPPED)
    res = toy.measure(pipe, n_per_prompt=2, seed=101)
    assert set(res["colour_rate"]) == set(toy.COLOURS)
    for colour, rate in res["colour_rate"].items():
        assert rate >= 0.95, (colour, res["colour_counts"][colour])
    assert res["shape_acc"] >= 0.75, res["shape_acc_by_shape"]
    assert len(res["images"]["a red circle"]) == 2
