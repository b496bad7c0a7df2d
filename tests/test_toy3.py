"""Tests of toy world 3 (`python -m utils.toy train --recipe toy3`): the contrastive text encoder, its freezing in the
U-Net phase, SD 1.x's schedule and attention layout, "an" before vowels (toy 2's prompts unchanged), and resuming
(in SDXL's shape: tests/test_toy3_sdxl.py)."""
from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from utils.toy import language as L  # noqa: E402
from utils.toy import measure as M  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--n_images", "48", "--vae_steps", "2", "--unet_steps", "3", "--clip_steps", "4", "--clip_batch_size", "16",
        "--vae_batch_size", "4", "--unet_batch_size", "4", "--text_width", "32", "--quiet", "--threads", "1"]


def _train(out: Path, *flags: str) -> Path:
    from utils.toy.cli import main, parse_args

    main(parse_args(["train", "--output_dir", str(out), *TINY, *flags]))
    return out


# ------------------------------------------------------------------------------------------------ articles
def test_toy3_prompts_say_an_before_vowels_and_toy2_prompts_are_unchanged(tmp_path):
    for c in L.COLOURS:
        for kind, prompts in L.prompt_sets(c, an=True).items():
            for p, _ in prompts:
                words = p.split()
                assert not any(a == "a" and b[0] in "aeiou" for a, b in zip(words, words[1:])), p
    toy3 = [p for p, _ in L.prompt_sets("orange", an=True)["explicit"]]
    assert "an orange circle" in toy3 and "a picture of an orange square" in toy3 and "a orange circle" not in toy3
    assert ("an emerald coloured circle", "circle") in L.prompt_sets("green", an=True)["paraphrase"]
    # toy 2 was trained and measured on "a orange circle": its prompts stay as they were
    toy2 = [p for p, _ in L.prompt_sets("orange")["explicit"]]
    assert "a orange circle" in toy2 and "a picture of a orange square" in toy2 and "an orange circle" not in toy2
    assert {"an apple", "a picture of an apple"} <= {p for p, _ in L.prompt_sets("red")["implied"]} | \
        set(L.object_captions("apple"))
    # the held-out split holds with either grammar
    trained = L.training_captions(an=True)
    assert all(p not in trained for c in L.COLOURS for p, _ in L.prompt_sets(c, an=True)["paraphrase"])
    # the model folder says which grammar: none (toy 2) is "a", toy3's toy_language.json "an"
    assert not M.uses_an(ROOT / "assets" / "toy-sd") and not M.uses_an(tmp_path)
    (tmp_path / "toy_language.json").write_text('{"articles": "an"}')
    assert M.uses_an(tmp_path)
    an_items, a_items = M.quality_items(1, an=True), M.quality_items(1)
    assert len(an_items) == len(a_items) and [i.group for i in an_items] == [i.group for i in a_items]
    assert "an orange circle" in {i.prompt for i in an_items} and "a orange circle" in {i.prompt for i in a_items}
    # a free-form prompt is measured the same in either grammar
    assert M.item_for_prompt("an amber coloured circle", 0).group == "paraphrase"
    assert M.item_for_prompt("a amber coloured circle", 0).group == "paraphrase"


# ------------------------------------------------------------------------------------------------ contrastive phase
def test_info_nce_is_clips_loss_on_distinct_pairs_and_soft_on_shared_ones():
    from utils.toy.contrastive import INIT_LOGIT_SCALE, caption_labels, compatible, info_nce

    g = torch.Generator().manual_seed(0)
    t, i = torch.randn(5, 8, generator=g), torch.randn(5, 8, generator=g)
    scale = torch.tensor(INIT_LOGIT_SCALE)
    logits = scale.exp() * torch.nn.functional.normalize(t, dim=-1) @ torch.nn.functional.normalize(i, dim=-1).T
    clip = (torch.nn.functional.cross_entropy(logits, torch.arange(5)) +
            torch.nn.functional.cross_entropy(logits.T, torch.arange(5))) / 2
    assert torch.allclose(info_nce(t, i, scale, torch.eye(5)), clip)
    labels = caption_labels(["a red circle", "red", "an apple", "a circle", "a brick"])
    images = torch.tensor([[0, 0], [0, 1], [1, 0]])  # red circle, red square, orange circle
    assert compatible(labels, images).tolist() == [[1, 0, 0], [1, 1, 0], [1, 0, 0], [1, 0, 1], [0, 1, 0]]


def test_contrastive_training_lowers_the_loss_and_moves_only_the_text_side(tmp_path):
    from utils.toy.contrastive import ClipHeads, caption_labels, contrastive_loss_fn, train_text_encoder
    from utils.toy.models import build_sd
    from utils.toy.render import make_dataset
    from utils.toy.train import _to_unit, caption_list, caption_table, make_tokenizer

    torch.set_num_threads(1)
    tok = make_tokenizer(tmp_path / "tok")
    images, labels = make_dataset(72, 0)
    encoder = build_sd(tok, 0, text_width=32, attention="all").text_encoders["text_encoder"]
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    args = argparse.Namespace(seed=0, clip_dim=16, clip_batch_size=32, clip_lr=3e-3, clip_steps=40, articles="an",
                              quiet=True, checkpoint_every=1000)

    def loss_now() -> float:  # the loss of the trained encoder with the checkpoint's heads, on one fixed batch
        heads = ClipHeads(32, 16)
        state = torch.load(tmp_path / "ck/text_encoder/checkpoint-40/state.pt", weights_only=False)["modules"]
        heads.load_state_dict(state["clip_heads"])
        ids, index, probs = caption_table(tok, labels, an=True, empty=0.0)
        cap_labels = caption_labels(caption_list(True))
        x = _to_unit(images)
        img_labels = torch.tensor([[list(L.COLOURS).index(c), L.SHAPES.index(s)] for c, s in labels])
        fn = contrastive_loss_fn(encoder, heads, x, img_labels, ids, index, probs, cap_labels, 32)
        with torch.no_grad():
            return float(fn(torch.Generator().manual_seed(7))[0]), heads

    res = train_text_encoder(encoder, images, labels, tok, args, tmp_path / "ck", logging.getLogger("test"))
    trained_loss, heads = loss_now()
    assert any(not torch.equal(before[k], v) for k, v in encoder.state_dict().items())  # the encoder moved
    assert not any(p.requires_grad for p in encoder.parameters())  # and leaves frozen
    encoder.load_state_dict(before)
    untrained_loss, _ = loss_now()
    assert trained_loss < untrained_loss - 0.3, (trained_loss, untrained_loss)
    assert set(res["retrieval"]) == {"explicit", "paraphrase", "implied"} and "''" in res["cos('red', .)"]


# ------------------------------------------------------------------------------------------------ the recipe end to end
def test_toy3_freezes_the_text_encoder_in_the_unet_phase_and_uses_sd1s_recipe(tmp_path):
    from diffusers import DDIMScheduler, UNet2DConditionModel
    from safetensors.torch import load_file

    toy2 = _train(tmp_path / "toy2", "--text_width", "64")
    out = _train(tmp_path / "toy3", "--recipe", "toy3", "--keep_checkpoints", "--vae_from", str(toy2))
    ck = out / "checkpoints"
    text_state = torch.load(ck / "text_encoder/checkpoint-4/state.pt", weights_only=False)["modules"]["text_encoder"]
    saved = load_file(out / "text_encoder" / "model.safetensors")
    # the U-Net phase left the contrastive encoder bit for bit as the contrastive phase ended
    assert all(torch.equal(saved[k], v) for k, v in text_state.items() if k in saved) and len(saved) >= 20
    unet_state = torch.load(ck / "unet/checkpoint-3/state.pt", weights_only=False)
    assert set(unet_state["modules"]) == {"unet"}  # only the U-Net is trained, averaged and checkpointed
    unet = UNet2DConditionModel.from_pretrained(out / "unet")
    n_unet = len(list(unet.parameters()))
    assert sum(len(g["params"]) for g in unet_state["opt"]["param_groups"]) == n_unet  # the optimizer's: U-Net only
    # the VAE is toy 2's, copied
    vae2, vae3 = (load_file(d / "vae" / "diffusion_pytorch_model.safetensors") for d in (toy2, out))
    assert all(torch.equal(vae2[k], vae3[k]) for k in vae2)
    # SD 1.x: epsilon on scaled-linear betas, leading spacing; cross-attention at every level; "an" recorded
    config = DDIMScheduler.load_config(out / "scheduler")
    assert config["prediction_type"] == "epsilon" and not config["rescale_betas_zero_snr"]
    assert config["timestep_spacing"] == "leading" and config["beta_schedule"] == "scaled_linear"
    assert unet.config.down_block_types == ["CrossAttnDownBlock2D"] * 2 and unet.config.cross_attention_dim == 32
    assert M.uses_an(out) and not M.uses_an(toy2)


def test_resume_refuses_a_changed_recipe_and_zero_snr_needs_v_prediction(tmp_path):
    from utils.cli import UserError
    from utils.toy.cli import parse_args

    out = _train(tmp_path / "run", "--recipe", "toy3", "--keep_checkpoints")
    (out / "model_index.json").unlink()  # as if stopped before saving: the checkpoints are resumed
    with pytest.raises(UserError, match=r"--recipe toy3 \(now toy2\)"):
        _train(out, "--recipe", "toy2")
    with pytest.raises(UserError, match=r"--caption_dropout 0.1 \(now 0.2\)"):
        _train(out, "--recipe", "toy3", "--caption_dropout", "0.2")
    _train(out, "--recipe", "toy3")  # the same flags resume
    assert (out / "model_index.json").is_file()
    with pytest.raises(SystemExit):
        parse_args(["train", "--recipe", "toy3", "--zero_snr"])
    assert parse_args(["train", "--recipe", "toy3"]).output_dir == "outputs/toy3-sd"
    assert parse_args(["train"]).output_dir == "outputs/toy-sd"
    # either recipe trains either family (tests/test_toy3_sdxl.py)
    assert parse_args(["train", "--family", "sdxl", "--recipe", "toy3"]).output_dir == "outputs/toy3-sdxl"


def test_shipped_toy3_is_sd1s_recipe_and_draws_an_orange_circle(one_thread):
    """assets/toy3-sd: trained with --recipe toy3 (its log's flags), epsilon on SD's schedule, measured on 'an'."""
    import ast
    import json

    from utils.toy.cli import parse_args

    shipped = ROOT / "assets" / "toy3-sd"
    logged = ast.literal_eval((shipped / "train_toy.log").read_text().splitlines()[0].split("train: ", 1)[1])
    assert logged["recipe"] == "toy3" and logged["vae_from"] == "assets/toy-sd"
    defaults = vars(parse_args(["train", "--recipe", "toy3", "--vae_from", "assets/toy-sd"]))
    ignored = {"output_dir", "keep_checkpoints", "quiet", "threads", "checkpoint_every", "overwrite"}
    assert {k: v for k, v in logged.items() if k not in ignored} == {k: defaults[k] for k in logged if k not in ignored}
    assert json.loads((shipped / "scheduler" / "scheduler_config.json").read_text())["prediction_type"] == "epsilon"
    assert M.uses_an(shipped)
    items = [it for it in M.quality_items(n=1, seed=101, colours=["orange", "green"], an=True) if it.shape == "circle"]
    assert "an orange circle" in {it.prompt for it in items}
    res = M.quality(items, M.draw(M.load_pipeline(shipped), items))
    assert res["rate"]["explicit"]["orange"] >= 0.8 and res["shape_acc"]["all"] >= 0.8, res["rate"]
