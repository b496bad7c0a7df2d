"""Tests of the toy world: the caption language and its held-out split, rendering, the judge, preservation,
a few steps of training, the measurement prompts and the shipped model's base quality."""
from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from utils import toy  # noqa: E402
from utils.toy import language as L  # noqa: E402
from utils.toy import measure as M  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "assets" / "toy-sd"


# ------------------------------------------------------------------------------------------------ language
def test_language_tables_are_consistent():
    assert set(L.COLOUR_WORDS) == set(L.COLOURS) and len(L.COLOURS) == 6
    assert {"orange", "purple"} <= set(L.COLOURS)
    assert all(2 <= len(ws) <= 3 for ws in L.COLOUR_WORDS.values())
    words = [w for ws in L.COLOUR_WORDS.values() for w in ws]
    assert len(words) == len(set(words))  # a word names one colour
    for c in L.COLOURS:
        assert len(L.objects_of(c)) >= 2, c  # at least two objects imply each colour
    assert not set(L.OBJECTS) & set(words) and not set(L.OBJECTS) & set(L.SHAPES)
    assert len(L.TEMPLATES) >= 4
    assert all(t in L.TEMPLATES and 0 <= i < 3 for t, i in L.HELD_OUT)


def test_object_words_never_appear_beside_colour_words_in_training():
    colour_words = {w for ws in L.COLOUR_WORDS.values() for w in ws}
    for cap in L.training_captions():
        ws = set(cap.split())
        if ws & set(L.OBJECTS):
            assert not ws & colour_words and not ws & set(L.SHAPES), cap


def test_held_out_paraphrases_are_never_trained():
    trained = L.training_captions()
    for c in L.COLOURS:
        sets = L.prompt_sets(c)
        assert len(sets["paraphrase"]) == len(L.HELD_OUT) * len(L.SHAPES)
        for p, _ in sets["paraphrase"]:
            assert p not in trained, p
        for p, _ in sets["explicit"] + sets["implied"]:
            assert p in trained, p
    # the held-out words are trained in other templates, so a paraphrase is a new combination, not a new word
    for template, pos in L.HELD_OUT:
        word = L.COLOUR_WORDS["red"][pos]
        assert any(word in cap.split() for cap in trained)
    # and the sampler never draws a held-out caption
    rng = np.random.default_rng(0)
    drawn = {L.training_caption(c, s, rng) for c in L.COLOURS for s in L.SHAPES for _ in range(60)}
    assert drawn <= trained and len(drawn) > 150


def test_caption_distribution_and_parsing():
    for c in L.COLOURS:
        for s in L.SHAPES:
            dist = L.caption_distribution(c, s)
            assert sum(p for _, p in dist) == pytest.approx(1.0)
            assert dict(dist)[""] == pytest.approx(L.CAPTION_MIX["empty"])
            for cap, _ in dist:
                pc, ps = L.parse_prompt(cap)
                assert pc in (c, None) and ps in (s, None), cap
    assert L.parse_prompt("a picture of an apple") == ("red", "circle")
    assert L.parse_prompt("A circle in Crimson.") == ("red", "circle")
    assert L.parse_prompt("violet") == ("purple", None)
    assert L.parse_prompt("a photo of a dog") == (None, None)


def test_tokenizer_one_token_per_word(tmp_path):
    from utils.toy.train import make_tokenizer

    tok = make_tokenizer(tmp_path)
    for word in L.vocabulary():
        assert len(tok(word, add_special_tokens=False).input_ids) == 1, word
    longest = max(L.training_captions() | {p for c in L.COLOURS for ps in L.prompt_sets(c).values() for p, _ in ps},
                  key=lambda p: len(p.split()))
    assert len(tok(longest).input_ids) <= toy.MODEL_MAX_LENGTH


# ------------------------------------------------------------------------------------------------ render and judge
def test_render_is_seeded_on_white_and_balanced():
    a = toy.render("orange", "circle", np.random.default_rng(3))
    assert np.array_equal(np.asarray(a), np.asarray(toy.render("orange", "circle", np.random.default_rng(3))))
    white = (255, 255, 255)
    assert a.size == (32, 32) and (tuple(np.asarray(a)[0, 0]) == white or tuple(np.asarray(a)[-1, -1]) == white)
    with pytest.raises(ValueError):
        toy.render("pink", "circle", np.random.default_rng(0))
    _, labels = toy.make_dataset(180, seed=1)
    counts = {c: sum(lab[0] == c for lab in labels) for c in L.COLOURS}
    assert set(counts.values()) == {30}


def test_judge_on_all_six_colours():
    images, labels = toy.make_dataset(1200, seed=7)
    verdicts = [toy.judge(im) for im in images]
    for c in L.COLOURS:
        ok = [v == lab for v, lab in zip(verdicts, labels) if lab[0] == c]
        assert np.mean(ok) >= 0.99, c


def _disc(colour: tuple[int, int, int], size: int = 16) -> np.ndarray:
    img = np.full((32, 32, 3), 255, np.uint8)
    yy, xx = np.mgrid[:32, :32]
    img[(yy - 16) ** 2 + (xx - 16) ** 2 <= (size / 2) ** 2] = colour
    return img


def test_judge_sees_off_palette_colours_as_other():
    assert toy.judge(_disc((220, 30, 30))) == ("red", "circle")
    assert toy.judge(_disc((232, 164, 34)))[0] == "other"  # the orange-ish yellow an erasure drew
    assert toy.judge(_disc((234, 90, 25)))[0] == "other"   # between red and orange
    assert toy.judge(_disc((90, 50, 200)))[0] == "other"   # between blue and purple
    # the lenient reading names the nearest palette colour at any distance: a crimson is red, red-orange is orange
    assert toy.judge(_disc((199, 18, 80)))[0] == "other" and toy.nearest_colour(_disc((199, 18, 80))) == "red"
    assert toy.nearest_colour(_disc((234, 90, 25))) == "orange" and toy.nearest_colour(_disc((220, 30, 30))) == "red"
    assert toy.nearest_colour(np.full((32, 32, 3), 255, np.uint8)) is None
    assert toy.judge(np.full((32, 32, 3), 255, np.uint8)) == (None, None)
    bar = np.full((32, 32, 3), 255, np.uint8)
    bar[14:17, 2:30] = (30, 60, 220)
    assert toy.judge(bar) == ("blue", None)  # blue, but no clear shape


def test_preservation_on_known_pairs():
    base = _disc((240, 210, 20))
    assert toy.preserved(base, base)
    assert toy.preserved(base, _disc((236, 204, 30)))           # a slightly different yellow, same disc
    assert not toy.preserved(base, _disc((232, 164, 34)))       # yellow turned orange-ish
    moved = np.roll(base, 9, axis=1)
    assert toy.judge(moved) == toy.judge(base) and not toy.preserved(base, moved)  # same verdict, other place
    assert toy.iou(base.min(-1) < 200, moved.min(-1) < 200) < 0.7


# ------------------------------------------------------------------------------------------------ measuring
def test_items_are_seeded_per_prompt_and_round_trip_through_csv(tmp_path):
    red = M.erasure_items(["red"], n=2, seed=3)
    both = M.erasure_items(["red", "blue"], n=2, seed=3)
    seeds = {(it.prompt, it.seed) for it in red if it.group != "keep"}
    assert seeds <= {(it.prompt, it.seed) for it in both}  # a prompt's seeds do not depend on what else is measured
    groups = {it.group for it in red}
    assert groups == {"explicit", "paraphrase", "implied", "keep"}
    assert not any(it.colour == "red" for it in red if it.group == "keep")
    assert {it.colour for it in red if it.group == "keep"} == set(L.COLOURS) - {"red"}
    M.write_items(red, tmp_path / "red.csv")
    with open(tmp_path / "red.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    back = M.items_from_records([{**r, "seed": r["evaluation_seed"]} for r in rows])
    assert back == red
    with pytest.raises(Exception, match="pink"):
        M.erasure_items(["pink"])


def test_erasure_summary_on_rendered_images():
    """Rates and preservation computed on images whose verdicts are known."""
    items = M.erasure_items(["red"], n=1)
    rng = np.random.default_rng(0)
    before = [toy.render(it.colour, it.shape or "circle", rng) for it in items]
    # 'after': red prompts drawn orange-ish (other); every kept image the same as before except the orange ones
    after = [toy.render("green", it.shape or "circle", rng) if it.colour == "red" else
             (toy.render("purple", it.shape, rng) if it.colour == "orange" else im) for it, im in zip(items, before)]
    res = M.erasure(items, before, after, ["red"])
    assert res["before"]["explicit"]["red"] == 1.0 and res["after"]["explicit"]["red"] == 0.0
    assert res["after"]["implied"]["red"] == 0.0 and res["after_nearest"]["explicit"]["red"] == 0.0  # green is green
    assert res["preserved"]["orange"] == 0.0 and res["preserved_neighbours"] == 0.0
    assert res["preserved_others"] == 1.0 and res["preserved"]["blue"] == 1.0
    # what a person sees: red prompts now draw green, orange prompts purple, the others unchanged
    assert res["drawn_before"]["red"] == {"red": 1.0} and res["drawn_after"]["red"] == {"green": 1.0}
    assert res["drawn_after"]["orange"] == {"purple": 1.0} and res["drawn_after"]["blue"] == {"blue": 1.0}
    assert (res["drawn_neighbours"], res["drawn_others"]) == (0.0, 1.0)  # the colour alone, split as preserved
    old = {k: v for k, v in res.items() if k not in ("drawn_neighbours", "drawn_others")}  # saved before the keys
    assert M.drawn_split(old) == (0.0, 1.0)
    from utils.toy.cli import format_erasure
    assert "  red      green 100.0\n  orange   purple 100.0\n" in format_erasure(res)
    # red prompts drawn crimson: no red to the judge, all red to the lenient reading, and the table says both
    crimson = [_disc((199, 18, 80)) if it.colour == "red" else im for it, im in zip(items, before)]
    res = M.erasure(items, before, crimson, ["red"])
    assert res["after"]["explicit"]["red"] == 0.0 and res["after_nearest"]["explicit"]["red"] == 1.0
    assert res["after_nearest"]["implied"]["red"] == 1.0 and res["preserved_others"] == 1.0
    lenient = "red, lenient reading (nearest palette colour), explicit / paraphrase / implied: 100.0 / 100.0 / 100.0"
    assert lenient in format_erasure(res)


# ------------------------------------------------------------------------------------------------ training
def test_few_steps_of_training_give_a_seeded_loadable_pipeline(tmp_path):
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from safetensors.torch import load_file

    from utils.cli import UserError
    from utils.families import FAMILIES
    from utils.toy.cli import main, parse_args

    flags = ["--n_images", "48", "--vae_steps", "2", "--unet_steps", "3", "--vae_batch_size", "4",
             "--unet_batch_size", "4", "--quiet"]
    out, again = tmp_path / "toy", tmp_path / "again"
    main(parse_args(["train", "--output_dir", str(out), *flags]))
    main(parse_args(["train", "--output_dir", str(again), *flags]))
    w1 = load_file(out / "unet" / "diffusion_pytorch_model.safetensors")
    w2 = load_file(again / "unet" / "diffusion_pytorch_model.safetensors")
    assert w1.keys() == w2.keys() and all(torch.equal(w1[k], w2[k]) for k in w1)
    assert (out / "sampling_defaults.json").exists() and not (out / "checkpoints").exists()
    weights = out / "unet" / "diffusion_pytorch_model.safetensors"
    before = weights.read_bytes()
    with pytest.raises(UserError, match="already holds a toy pipeline; pass --overwrite"):
        main(parse_args(["train", "--output_dir", str(out), *flags, "--seed", "1"]))
    assert weights.read_bytes() == before  # a finished model is never replaced without asking
    main(parse_args(["train", "--output_dir", str(out), *flags, "--seed", "1", "--overwrite"]))
    assert weights.read_bytes() != before
    pipe = StableDiffusionPipeline.from_pretrained(out, safety_checker=None, requires_safety_checker=False)
    assert isinstance(pipe.scheduler, DDIMScheduler)
    assert pipe.vae.config.scaling_factor != 0.18215  # set from the latents' std
    assert FAMILIES["sd"].load(str(out)).default_resolution == 32
    pipe.set_progress_bar_config(disable=True)
    a = toy.sample_images(pipe, ["a red circle", "an apple", "a red circle"], [5, 6, 5], num_inference_steps=2,
                          batch_size=2)
    b = toy.sample_images(pipe, ["a red circle"], [5], num_inference_steps=2, batch_size=1)
    assert np.abs(np.asarray(a[0], dtype=int) - np.asarray(a[2], dtype=int)).max() <= 1
    assert np.abs(np.asarray(a[0], dtype=int) - np.asarray(b[0], dtype=int)).max() <= 1

    # epsilon is undefined at zero SNR, which is on by default
    for bad in (["--prediction_type", "epsilon"], ["--unet_ema_decay", "1"], ["--vae_rgb_weight", "-1"]):
        with pytest.raises(SystemExit):
            parse_args(["train", *bad])
    config = DDIMScheduler.load_config(out / "scheduler")  # the defaults: the shipped model's recipe
    assert config["prediction_type"] == "v_prediction" and config["rescale_betas_zero_snr"]
    assert config["timestep_spacing"] == "trailing"
    first = tmp_path / "first"  # the first recipe: SD 1.x's target and schedule, a free VAE, no average
    main(parse_args(["train", "--output_dir", str(first), *flags, "--prediction_type", "epsilon", "--no-zero_snr",
                     "--vae_rgb_weight", "0", "--unet_ema_decay", "0"]))
    config = DDIMScheduler.load_config(first / "scheduler")
    assert config["prediction_type"] == "epsilon" and not config["rescale_betas_zero_snr"]
    assert not torch.equal(load_file(first / "unet" / "diffusion_pytorch_model.safetensors")["conv_out.bias"],
                           w1["conv_out.bias"])  # same seed and data, another target


def test_vae_rgb_weight_ties_the_first_latent_channels_to_the_colours(tmp_path, one_thread):
    import argparse
    import logging

    import torch.nn.functional as F

    from utils.toy.render import make_dataset
    from utils.toy.train import _to_unit, build_models, encode_moments, make_tokenizer, train_vae

    images, _ = make_dataset(36, 0)
    x = _to_unit(images)
    tie = {}
    for weight in (0.0, 1.0):
        _, vae, _ = build_models(make_tokenizer(tmp_path / "tok"), 0)
        args = argparse.Namespace(vae_batch_size=8, vae_lr=1e-3, vae_steps=15, vae_kl_weight=1e-6,
                                  vae_rgb_weight=weight, seed=0, quiet=True, checkpoint_every=1000)
        train_vae(vae, images, args, tmp_path / f"w{weight}", logging.getLogger("test"))
        means, _ = encode_moments(vae, images)
        tie[weight] = F.mse_loss(means[:, :3], F.avg_pool2d(x, 2)).item()
    # without the tie the channels are whatever reconstruction found; with it they follow the colours
    assert tie[1.0] < 0.2 * tie[0.0], tie


def test_toy_training_ema_is_the_warm_up_average_of_the_weights_and_survives_a_resume(tmp_path):
    import argparse
    import logging

    from utils.toy.train import _resumable_loop

    def run(ckpt_dir, decay, stop_at=None):
        torch.manual_seed(0)
        lin = torch.nn.Linear(3, 2)
        seen = []

        def loss_fn(gen):
            if stop_at is not None and len(seen) == stop_at:
                raise KeyboardInterrupt  # a stop after the checkpoint of step 3
            seen.append([p.detach().clone() for p in lin.parameters()])
            x = torch.randn(4, 3, generator=gen)
            return lin(x).pow(2).mean(), {}

        args = argparse.Namespace(quiet=True, checkpoint_every=3)
        _resumable_loop("m", {"m": lin}, list(lin.parameters()), 0.1, 0.0, 6, 0, loss_fn, args, ckpt_dir,
                        logging.getLogger("test"), ema_decay=decay)
        return [p.detach() for p in lin.parameters()], seen

    final, seen = run(tmp_path / "ema", 0.9)
    last = list(torch.load(tmp_path / "ema/m/checkpoint-6/state.pt", weights_only=False)["modules"]["m"].values())
    expected = [t.clone() for t in seen[0]]
    for s, weights in enumerate(seen[1:] + [last]):
        w = 1 - min(0.9, (s + 1) / (s + 10))
        expected = [e + w * (x - e) for e, x in zip(expected, weights)]
    assert all(torch.allclose(f, e, atol=1e-6) for f, e in zip(final, expected))
    assert not all(torch.allclose(f, x) for f, x in zip(final, last))  # the average, not the last weights
    plain, _ = run(tmp_path / "plain", 0.0)
    assert all(torch.equal(f, x) for f, x in zip(plain, last))  # without a decay: the last weights, as before
    from utils.cli import UserError
    with pytest.raises(UserError, match="without a weight average"):
        run(tmp_path / "plain", 0.9)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "stopped", 0.9, stop_at=4)
    resumed, _ = run(tmp_path / "stopped", 0.9)
    assert all(torch.equal(r, f) for r, f in zip(resumed, final))


@pytest.mark.usefixtures("shipped_toy")  # a missing model fails (conftest.py), never skips
def test_train_defaults_are_the_shipped_models_recipe():
    """`python -m utils.toy train` with no flags trains what assets/toy-sd/train_toy.log's first line records (all but
    where it went and how it reported)."""
    import ast

    from utils.toy.cli import parse_args

    logged = ast.literal_eval((SHIPPED / "train_toy.log").read_text().splitlines()[0].split("train: ", 1)[1])
    defaults = vars(parse_args(["train"]))
    ignored = {"output_dir", "keep_checkpoints", "quiet", "threads", "checkpoint_every", "overwrite"}
    assert {k: v for k, v in logged.items() if k not in ignored} == \
        {k: defaults[k] for k in logged if k not in ignored}


@pytest.mark.usefixtures("shipped_toy")  # a missing model fails (conftest.py), never skips
def test_shipped_model_draws_explicit_paraphrase_and_implied_colours(one_thread):
    pipe = toy.load_pipeline(SHIPPED)
    items = [it for it in M.quality_items(n=1, seed=101) if it.group == "implied" or it.shape == "circle"]  # 61
    res = M.quality(items, M.draw(pipe, items))
    for kind in M.KINDS:
        rates = res["rate"][kind]
        assert set(rates) == set(L.COLOURS)
        assert np.mean(list(rates.values())) >= 0.85, (kind, rates)
    assert res["shape_acc"]["all"] >= 0.85


@pytest.mark.usefixtures("shipped_toy")  # a missing model fails (conftest.py), never skips
def test_panels_draws_one_block_per_model_and_checks_every_unet_first(tmp_path, one_thread):
    from utils.cli import UserError
    from utils.toy.cli import main, parse_args

    out = tmp_path / "panels.png"
    flags = ["--prompts", "a red circle", "an apple", "--n_per_prompt", "1", "--steps", "2", "--output", str(out)]
    with pytest.raises(UserError, match="--unet gone=/no/such/unet: /no/such/unet does not exist"):
        main(parse_args(["panels", "--base", str(SHIPPED), "--unet", f"same={SHIPPED / 'unet'}", "gone=/no/such/unet",
                         *flags]))
    assert not out.exists()
    with pytest.raises(UserError, match="--unet /no/such/unet does not exist"):
        main(parse_args(["compare", "--unet", "/no/such/unet", "--output", str(tmp_path / "c.png")]))
    main(parse_args(["panels", "--base", str(SHIPPED), "--unet", f"same={SHIPPED / 'unet'}", *flags]))
    from PIL import Image

    grid = np.asarray(Image.open(out).convert("RGB"))
    cell = 2 * 32 + 2  # a 32-pixel image shown twice as large, and the gap
    assert grid.shape[:2] == (14 + 2 * cell, 150 + 2 * (cell + 12))  # title row + 2 prompts; label column + 2 blocks
    base, same = grid[14:, 150:150 + cell - 2], grid[14:, 150 + cell + 12:150 + 2 * cell + 10]
    assert np.array_equal(base, same)  # the base U-Net loaded as an 'erased' one draws the same images
