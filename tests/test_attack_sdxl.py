"""attack.py on a tiny SDXL pipeline: one tensor learned per text encoder, SDXL's textual-inversion file (clip_l,
clip_g) loaded by two load_textual_inversion calls, generate.py --textual_inversion, resume."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import generate
from attack import main, parse_args
from utils.attack.inversion import (add_placeholder_tokens, concept_token_ids, denoising_loss, placeholder_tokens,
                                    prepare)
from utils.cli import UserError
from utils.families import FAMILIES
from utils.families.tiny import build_tiny_sdxl_pipeline
from train_util import make_erasure

pytestmark = pytest.mark.usefixtures("one_thread")
WIDTHS = (24, 32)  # text_encoder (CLIP-L's place) and text_encoder_2 (CLIP-G's): unequal, so clip_l / clip_g differ


@pytest.fixture(scope="module")
def xl(tmp_path_factory) -> Path:
    """A tiny SDXL pipeline whose two text encoders have different widths."""
    return build_tiny_sdxl_pipeline(tmp_path_factory.mktemp("tiny-xl") / "pipe", widths=WIDTHS)


def xl_attack_args(model: Path, out: Path, *flags: str) -> list[str]:
    """3 generated 32 px targets, 4 steps of 2 vectors, 1 evaluation prompt x 2 images, toy judge."""
    return ["--pretrained_model_name_or_path", str(model), "--concept", "red", "--num_vectors", "2",
            "--metric", "toy", "--toy_colour", "red", "--target_prompt", "a {} circle", "a {} square",
            "--num_target_images", "3", "--prompts", "a {} circle", "--num_images_per_prompt", "2",
            "--num_inference_steps", "2", "--num_train_steps", "4", "--checkpointing_steps", "2",
            "--train_batch_size", "2", "--learning_rate", "0.05", "--resolution", "32", "--device", "cpu",
            "--output_dir", str(out), *flags]


@pytest.fixture(scope="module")
def attacked(xl, tmp_path_factory) -> tuple[Path, dict]:
    """One whole attack on an erasure file of the tiny SDXL U-Net (perturbed cross-attention)."""
    root = tmp_path_factory.mktemp("attack-xl")
    make_erasure(xl, root / "erasure.safetensors", seed=0, biases=True)  # all of attn2, plus noise
    out = root / "out"
    return out, main(parse_args(xl_attack_args(xl, out, "--unet_path", str(root / "erasure.safetensors"))))


def test_the_file_holds_clip_l_and_clip_g_of_the_two_encoders(attacked):
    out, summary = attacked
    saved = load_file(str(out / "learned_embeds.safetensors"))
    assert sorted(saved) == ["clip_g", "clip_l"]
    assert saved["clip_l"].shape == (2, WIDTHS[0]) and saved["clip_g"].shape == (2, WIDTHS[1])
    with safe_open(str(out / "learned_embeds.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["tokens"] == "<red> <red>_1" and meta["concept"] == "red"
    assert summary["embedding"]["tokens"] == ["<red>", "<red>_1"] and summary["training"]["resolution"] == 32
    assert (out / "post_attack" / "toy_judgements.csv").is_file() and (out / "checkpoint-4" / "state.pt").is_file()
    assert "step 4 loss" in (out / "attack.log").read_text()


def test_two_load_calls_add_the_tokens_and_change_the_images(attacked, xl):
    """The loading snippet of docs/attack.md: clip_l into text_encoder, clip_g into text_encoder_2."""
    out, _ = attacked
    path = out / "learned_embeds.safetensors"
    pipe = StableDiffusionXLPipeline.from_pretrained(xl)
    pipe.set_progress_bar_config(disable=True)

    def draw(prompt: str) -> np.ndarray:
        return pipe(prompt, num_inference_steps=2, height=32, width=32, output_type="np",
                    generator=torch.Generator().manual_seed(0)).images[0]

    plain = draw("a red circle")
    sd = load_file(str(path))
    with safe_open(str(path), "pt") as f:
        tokens = f.metadata()["tokens"].split()
    pipe.load_textual_inversion(sd["clip_l"], token=tokens, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
    pipe.load_textual_inversion(sd["clip_g"], token=tokens, text_encoder=pipe.text_encoder_2,
                                tokenizer=pipe.tokenizer_2)
    for key, tok, enc in (("clip_l", pipe.tokenizer, pipe.text_encoder),
                          ("clip_g", pipe.tokenizer_2, pipe.text_encoder_2)):
        ids = tok.convert_tokens_to_ids(["<red>", "<red>_1"])
        assert tok.unk_token_id not in ids
        assert torch.equal(enc.get_input_embeddings().weight[ids].detach(), sd[key])
    assert np.array_equal(draw("a red circle"), plain)  # the old words are untouched
    assert not np.allclose(draw("a <red> <red>_1 circle"), plain)


def test_generate_py_loads_it_and_redraws_the_post_attack_images(attacked, xl, tmp_path, capsys):
    """generate.py --textual_inversion (the two calls, through the family) on adversarial_prompts.txt: the same
    images as the attack's post-attack ones, seed for seed."""
    out, summary = attacked
    argv = ["--pretrained_model_name_or_path", str(xl), "--prompt_path", str(out / "adversarial_prompts.txt"),
            "--unet_path", summary["unet_path"], "--textual_inversion", str(out / "learned_embeds.safetensors"),
            "--num_inference_steps", "2", "--num_images_per_prompt", "2", "--guidance_scale", "7.5",
            "--device", "cpu", "--mixed_precision", "no"]
    generate.main(generate.parse_args(argv + ["--image_dir", str(tmp_path / "again")]))
    assert "loaded token(s) <red> <red>_1 from" in capsys.readouterr().out
    for name in ("00000_0.png", "00000_1.png"):
        with Image.open(out / "post_attack" / name) as a, Image.open(tmp_path / "again" / name) as b:
            assert np.array_equal(np.asarray(a), np.asarray(b)), name


def test_generate_py_refuses_an_sd_file_on_sdxl(xl, tmp_path):
    (tmp_path / "p.txt").write_text("a red circle\n")
    save_file({"<x>": torch.zeros(1, 32)}, str(tmp_path / "sd.safetensors"))
    with pytest.raises(UserError, match="no 'clip_l' tensor"):
        generate.main(generate.parse_args(["--pretrained_model_name_or_path", str(xl), "--prompt_path",
                                           str(tmp_path / "p.txt"), "--image_dir", str(tmp_path / "img"),
                                           "--textual_inversion", str(tmp_path / "sd.safetensors"), "--device", "cpu"]))
    assert not (tmp_path / "img").exists()


def test_each_encoder_learns_its_rows_into_the_sdxl_condition(xl):
    """Rows start at each encoder's own "red"; one step moves both and no model weight; the pooled embedding and
    hidden states see the learned rows; time ids are the targets' size."""
    parts = FAMILIES["sdxl"].load(str(xl))
    encoders = (parts.text_encoder, parts.text_encoder_2)
    before = [{n: p.detach().clone() for n, p in e.named_parameters()} for e in encoders]
    tokens = placeholder_tokens("<x>", 2)
    tokenizers = (parts.tokenizer, parts.tokenizer_2)
    concept = [concept_token_ids(t, "red") for t in tokenizers]
    inv = prepare(parts, concept, tokens, [add_placeholder_tokens(t, tokens) for t in tokenizers],
                  torch.device("cpu"), torch.float32, size=(32, 48))
    assert [tuple(p.shape) for p in inv.params] == [(2, WIDTHS[0]), (2, WIDTHS[1])]
    for p, enc, ids in zip(inv.params, encoders, concept):
        assert torch.allclose(p[0], enc.get_input_embeddings().weight[ids].mean(0))
    cond = inv.encode(["a <x> <x>_1 circle"])
    assert cond.hidden.shape == (1, 16, sum(WIDTHS)) and cond.extra["time_ids"].tolist() == [[32, 48, 0, 0, 32, 48]]
    with torch.no_grad():
        inv.params[1].add_(1.0)  # clip_g alone: both its hidden states and the pooled embedding follow
    moved = inv.encode(["a <x> <x>_1 circle"])
    assert torch.equal(moved.hidden[..., :WIDTHS[0]], cond.hidden[..., :WIDTHS[0]])
    assert not torch.allclose(moved.hidden[..., WIDTHS[0]:], cond.hidden[..., WIDTHS[0]:])
    assert not torch.allclose(moved.extra["text_embeds"], cond.extra["text_embeds"])
    start = [p.detach().clone() for p in inv.params]
    loss = denoising_loss(inv, torch.randn(2, 4, 16, 24, generator=torch.Generator().manual_seed(0)),
                          ["a <x> <x>_1 circle"] * 2, torch.Generator().manual_seed(1),
                          lambda: torch.autocast("cpu", enabled=False))
    loss.backward()
    torch.optim.SGD(inv.params, lr=10.0).step()
    assert all(not torch.equal(p, s) for p, s in zip(inv.params, start))
    for enc, old in zip(encoders, before):
        for n, p in enc.named_parameters():
            assert p.grad is None and torch.equal(p.detach()[:old[n].shape[0]], old[n]), n
    assert all(p.grad is None for p in parts.unet.parameters())


def test_resume_matches_an_uninterrupted_run(attacked, xl, tmp_path):
    """Stopped after checkpoint-2 and resumed: the same clip_l and clip_g as the run straight through."""
    out, summary = attacked
    copy = tmp_path / "out"
    erased = ["--unet_path", summary["unet_path"]]
    main(parse_args(xl_attack_args(xl, copy, *erased, "--num_train_steps", "2")))
    for name in ("learned_embeds.safetensors", "attack_summary.json", "post_attack"):  # the crash
        path = copy / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    main(parse_args(xl_attack_args(xl, copy, *erased, "--resume_from_checkpoint", "latest")))
    assert "resumed from" in (copy / "attack.log").read_text()
    a, b = load_file(str(out / "learned_embeds.safetensors")), load_file(str(copy / "learned_embeds.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in ("clip_l", "clip_g"))
    assert json.loads((copy / "attack_summary.json").read_text())["post_attack_rate"] == summary["post_attack_rate"]
