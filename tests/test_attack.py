"""attack.py on the tiny pipeline: targets -> learned embedding -> load_textual_inversion -> images -> summary,
resume, and bad input refused in one line before anything is written."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image
from safetensors.torch import load_file

from attack import main, parse_args
from utils.attack.inversion import (Inversion, add_placeholder_tokens, concept_token_ids, default_placeholder, denoising_loss,
                          load_targets, placeholder_tokens, prepare)
from utils.cli import UserError
from utils.families import FAMILIES
from train_util import make_erasure
from utils.saving import save_erasure
from utils.families.tiny import tiny_unet

ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")


def attack_args(model: Path, out: Path, *flags: str) -> list[str]:
    """A tiny attack: 3 generated targets, 4 steps of 2 vectors, 2 evaluation prompts x 2 images, toy judge."""
    return ["--pretrained_model_name_or_path", str(model), "--concept", "red", "--num_vectors", "2",
            "--metric", "toy", "--toy_colour", "red", "--target_prompt", "a {} circle", "a {} square",
            "--num_target_images", "3", "--prompts", "a {} circle", "a {} square", "--num_images_per_prompt", "2",
            "--num_inference_steps", "2", "--num_train_steps", "4", "--checkpointing_steps", "2",
            "--train_batch_size", "2", "--learning_rate", "0.05", "--device", "cpu", "--output_dir", str(out), *flags]


@pytest.fixture(scope="module")
def attacked(tiny_pipeline, tmp_path_factory) -> tuple[Path, dict]:
    """One whole attack on the tiny pipeline; the erased U-Net is an erasure file of perturbed cross-attention."""
    root = tmp_path_factory.mktemp("attack")
    make_erasure(tiny_pipeline, root / "erasure.safetensors", seed=0, biases=True)  # all of attn2, plus noise
    out = root / "out"
    summary = main(parse_args(attack_args(tiny_pipeline, out, "--unet_path", str(root / "erasure.safetensors"))))
    return out, summary


def test_whole_path_writes_every_output(attacked):
    out, summary = attacked
    for name in ("learned_embeds.safetensors", "adversarial_prompts.txt", "pre_attack_prompts.txt", "attack.log",
                 "args.json", "attack_grid.png", "attack_summary.json", "checkpoint-2/state.pt",
                 "checkpoint-4/state.pt", "targets/metadata.csv", "post_attack/toy_judgements.csv"):
        assert (out / name).is_file(), name
    assert len(list((out / "targets").glob("*.png"))) == 3
    assert (out / "adversarial_prompts.txt").read_text().split("\n")[:2] == ["a <red> circle", "a <red> square"]
    assert (out / "pre_attack_prompts.txt").read_text().split("\n")[:2] == ["a red circle", "a red square"]
    assert json.loads((out / "attack_summary.json").read_text()) == summary
    log = (out / "attack.log").read_text()
    assert "step 4 loss" in log and "caption 'a <red> <red>_1" in log  # captions from the targets' prompts


def test_summary_rates_match_the_judge(attacked):
    out, s = attacked
    for phase, folder in (("pre_attack", "pre_attack"), ("post_attack", "post_attack")):
        table = pd.read_csv(out / folder / "toy_judgements.csv", keep_default_na=False)
        assert len(table) == s[phase]["images"] == 4
        assert s[f"{phase}_rate"] == pytest.approx((table["judged_colour"] == "red").mean())
    assert s["attack_success_rate"] == s["post_attack_rate"]
    assert s["rate_increase"] == pytest.approx(s["post_attack_rate"] - s["pre_attack_rate"])
    assert s["training"]["num_train_steps"] == 4 and s["training"]["learning_rate"] == 0.05
    assert s["embedding"]["tokens"] == ["<red>", "<red>_1"] and s["embedding"]["num_vectors"] == 2
    assert s["targets"]["images"] == 3 and s["targets"]["generated"] and s["targets"]["seed"] == 1000
    meta = pd.read_csv(out / "post_attack" / "metadata.csv", dtype=str, keep_default_na=False)
    pre = pd.read_csv(out / "pre_attack" / "metadata.csv", dtype=str, keep_default_na=False)
    assert list(meta["seed"]) == list(pre["seed"])  # same seeds before and after
    assert set(meta["prompt"]) == {"a <red> circle", "a <red> square"}


def test_embedding_loads_into_a_fresh_pipeline(attacked, tiny_pipeline):
    out, _ = attacked
    saved = load_file(str(out / "learned_embeds.safetensors"))
    assert list(saved) == ["<red>"] and saved["<red>"].shape == (2, 32)
    pipe = StableDiffusionPipeline.from_pretrained(tiny_pipeline)
    red = pipe.text_encoder.get_input_embeddings().weight[pipe.tokenizer.convert_tokens_to_ids("red</w>")].detach()
    pipe.load_textual_inversion(str(out / "learned_embeds.safetensors"))
    ids = pipe.tokenizer.convert_tokens_to_ids(["<red>", "<red>_1"])
    rows = pipe.text_encoder.get_input_embeddings().weight[ids].detach()
    assert torch.equal(rows, saved["<red>"])
    assert not torch.allclose(rows, red.expand(2, -1))  # trained away from its start, the word "red"
    assert pipe.maybe_convert_prompt("a <red> circle", pipe.tokenizer) == "a <red> <red>_1 circle"


def test_post_attack_images_come_back_from_generate_py(attacked, tiny_pipeline, tmp_path):
    """generate.py --textual_inversion on adversarial_prompts.txt redraws the post-attack images exactly."""
    import generate

    out, _ = attacked
    args = json.loads((out / "post_attack" / "args.json").read_text())
    generate.main(generate.parse_args([
        "--pretrained_model_name_or_path", str(tiny_pipeline), "--prompt_path", str(out / "adversarial_prompts.txt"),
        "--image_dir", str(tmp_path / "again"), "--unet_path", args["unet_path"], "--textual_inversion",
        str(out / "learned_embeds.safetensors"), "--num_inference_steps", "2", "--num_images_per_prompt", "2",
        "--guidance_scale", "7.5", "--device", "cpu", "--mixed_precision", "no"]))
    for name in ("00000_0.png", "00001_1.png"):
        with Image.open(out / "post_attack" / name) as a, Image.open(tmp_path / "again" / name) as b:
            assert np.array_equal(np.asarray(a), np.asarray(b)), name


def test_resume_matches_an_uninterrupted_run(attacked, tiny_pipeline, tmp_path):
    """An attack that crashed after checkpoint-2, resumed, ends with the same embedding as one run straight through."""
    out, summary = attacked
    copy = tmp_path / "out"
    erased = ["--unet_path", summary["unet_path"]]
    main(parse_args(attack_args(tiny_pipeline, copy, *erased, "--num_train_steps", "2")))
    for name in ("learned_embeds.safetensors", "attack_summary.json", "post_attack"):  # the crash
        path = copy / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    with pytest.raises(UserError, match="holds a started attack"):
        main(parse_args(attack_args(tiny_pipeline, copy, *erased)))
    with pytest.raises(UserError, match=r"other flags: --learning_rate 0.05 \(now 0.1\)"):  # not the same attack
        main(parse_args(attack_args(tiny_pipeline, copy, *erased, "--resume_from_checkpoint", "latest",
                                    "--learning_rate", "0.1")))
    again = main(parse_args(attack_args(tiny_pipeline, copy, *erased, "--resume_from_checkpoint", "latest")))
    assert "resumed from" in (copy / "attack.log").read_text()
    a, b = load_file(str(out / "learned_embeds.safetensors")), load_file(str(copy / "learned_embeds.safetensors"))
    assert torch.equal(a["<red>"], b["<red>"])
    assert again["post_attack_rate"] == summary["post_attack_rate"]
    # the scoring flags may change on a resume: the images are drawn again for them, none of the old ones is scored
    rescored = main(parse_args(attack_args(tiny_pipeline, copy, *erased, "--resume_from_checkpoint", "latest",
                                           "--prompts", "a {} triangle", "--num_images_per_prompt", "1")))
    assert rescored["pre_attack"]["images"] == rescored["post_attack"]["images"] == 1
    assert (copy / "pre_attack" / "metadata.csv").read_text().splitlines()[1].startswith("00000_0.png,a red triangle,")


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_only_the_new_rows_learn(prediction_type, tiny_pipeline, tiny_vpred_pipeline):
    """One step of the denoising loss moves the learned rows and leaves every model weight as it was."""
    parts = FAMILIES["sd"].load(str(tiny_pipeline if prediction_type == "epsilon" else tiny_vpred_pipeline))
    before = {n: p.detach().clone() for n, p in parts.text_encoder.named_parameters()}
    tokens = placeholder_tokens("<x>", 2)
    new_ids = add_placeholder_tokens(parts.tokenizer, tokens)
    inv: Inversion = prepare(parts, concept_token_ids(parts.tokenizer, "red"), tokens, new_ids,
                             torch.device("cpu"), torch.float32)
    start = inv.learned.detach().clone()
    opt = torch.optim.SGD([inv.learned], lr=10.0)
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    loss = denoising_loss(inv, latents, ["a <x> <x>_1 circle"] * 2, torch.Generator().manual_seed(1),
                          lambda: torch.autocast("cpu", enabled=False))
    loss.backward()
    opt.step()
    assert torch.isfinite(loss) and not torch.equal(inv.learned, start)
    for n, p in parts.text_encoder.named_parameters():
        assert p.grad is None
        rows = before[n].shape[0]
        assert torch.equal(p.detach()[:rows], before[n]), n
    assert all(p.grad is None for p in parts.unet.parameters())


def test_gradient_checkpointing_gives_the_same_gradient(tiny_pipeline):
    """--gradient_checkpointing recomputes the U-Net's activations; the learned rows' gradient is unchanged."""
    grads = []
    for checkpointing in (False, True):
        parts = FAMILIES["sd"].load(str(tiny_pipeline))
        tokens = placeholder_tokens("<x>", 1)
        inv = prepare(parts, concept_token_ids(parts.tokenizer, "red"), tokens,
                      add_placeholder_tokens(parts.tokenizer, tokens), torch.device("cpu"), torch.float32, checkpointing)
        assert parts.unet.is_gradient_checkpointing == checkpointing
        latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
        denoising_loss(inv, latents, ["a <x> circle"] * 2, torch.Generator().manual_seed(1),
                       lambda: torch.autocast("cpu", enabled=False)).backward()
        grads.append(inv.learned.grad)
    assert grads[0].abs().sum() > 0 and torch.allclose(grads[0], grads[1], rtol=1e-5, atol=1e-8)


def test_target_captions_follow_the_prompts(tmp_path):
    """A target whose prompt names the concept is captioned with it swapped; others get the templates."""
    for i, colour in enumerate(["red", "blue"]):
        Image.new("RGB", (20, 12), colour).save(tmp_path / f"{i}.png")
    pd.DataFrame({"file": ["0.png", "1.png"], "prompt": ["a Red circle", "a blue square"]}).to_csv(
        tmp_path / "metadata.csv", index=False)
    t = load_targets(tmp_path, 8, "red", "<r>", ["{}", "a photo of {}"])
    assert t.pixels.shape == (2, 3, 8, 8) and float(t.pixels.max()) <= 1 and float(t.pixels.min()) >= -1
    assert t.captions == [["a <r> circle"], ["<r>", "a photo of <r>"]]
    assert default_placeholder("a Red!") == "<a-red>"
    assert placeholder_tokens("<p>", 3) == ["<p>", "<p>_1", "<p>_2"]


# ------------------------------------------------------------------------------------------------------- bad input
def _refused(model: Path, out: Path, *flags: str, match: str) -> None:
    with pytest.raises(UserError, match=match):
        main(parse_args(attack_args(model, out, *flags)))
    assert not out.exists(), "nothing may be written on bad input"


def test_missing_target_folder(tiny_pipeline, tmp_path):
    _refused(tiny_pipeline, tmp_path / "out", "--target_dir", str(tmp_path / "nope"),
             match="--target_dir .* does not exist")


@pytest.mark.parametrize("concept, match", [("", "--concept is empty"), (" ".join(["red"] * 20), "is 20 tokens")])
def test_concept_not_tokenizable(tiny_pipeline, tmp_path, concept, match):
    _refused(tiny_pipeline, tmp_path / "out", "--concept", concept, match=match)


def test_placeholder_already_a_word(tiny_pipeline, tmp_path):
    _refused(tiny_pipeline, tmp_path / "out", "--placeholder_token", "circle", match="already in the tokenizer")


def test_erased_unet_that_does_not_fit(tiny_pipeline, tmp_path):
    tiny_unet(cross_attention_dim=16).save_pretrained(tmp_path / "other_unet")
    _refused(tiny_pipeline, tmp_path / "out", "--unet_path", str(tmp_path / "other_unet"), match="does not fit")
    save_erasure(tmp_path / "e.safetensors", {"nope.weight": torch.zeros(2)}, {"base_model": "x"})
    _refused(tiny_pipeline, tmp_path / "out", "--unet_path", str(tmp_path / "e.safetensors"), match="does not fit")


def test_bad_input_is_one_line_on_the_command_line(tiny_pipeline, tmp_path):
    """The script itself: exit code 2, one `error:` line, no output folder."""
    out = tmp_path / "out"
    res = subprocess.run([sys.executable, str(ROOT / "attack.py"), *attack_args(tiny_pipeline, out, "--target_dir",
                          str(tmp_path / "missing"))], capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    assert res.returncode == 2, res.stderr
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "--target_dir" in errors[0] and "Traceback" not in res.stderr
    assert not out.exists()


def test_generate_refuses_a_bad_embedding_file(tiny_pipeline, tmp_path):
    """generate.py --textual_inversion: a file that is no embedding, or a mode that cannot load one, is one line."""
    import generate

    (tmp_path / "p.txt").write_text("a red circle\n")
    (tmp_path / "bad.safetensors").write_text("not safetensors")
    base = ["--pretrained_model_name_or_path", str(tiny_pipeline), "--prompt_path", str(tmp_path / "p.txt"),
            "--image_dir", str(tmp_path / "img"), "--device", "cpu"]
    with pytest.raises(UserError, match="could not load the textual-inversion embedding"):
        generate.main(generate.parse_args(base + ["--textual_inversion", str(tmp_path / "bad.safetensors")]))
    with pytest.raises(UserError, match="is not a file"):
        generate.main(generate.parse_args(base + ["--textual_inversion", str(tmp_path / "none.safetensors")]))
    with pytest.raises(UserError, match="--pipeline_type sd"):
        generate.main(generate.parse_args(base + ["--textual_inversion", str(tmp_path / "bad.safetensors"),
                                                  "--pipeline_type", "sld"]))
    assert not (tmp_path / "img").exists()


def test_overwrite_output_dir_redoes_the_attack_with_none_of_the_old_outputs(attacked, tiny_pipeline, tmp_path):
    out, summary = attacked
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    again = main(parse_args(attack_args(tiny_pipeline, copy, "--unet_path", summary["unet_path"], "--overwrite_output_dir",
                                        "--num_images_per_prompt", "1", "--num_train_steps", "2")))
    assert again["pre_attack"]["images"] == again["post_attack"]["images"] == 2  # 2 prompts x 1, none of the old 4
    assert sorted(p.name for p in copy.glob("checkpoint-*")) == ["checkpoint-2"]  # the old run's checkpoint-4 went


def test_an_overwrite_stopped_before_training_leaves_no_old_embedding(attacked, tiny_pipeline, tmp_path, monkeypatch):
    import attack

    out, summary = attacked
    copy = tmp_path / "out"
    shutil.copytree(out, copy)

    def stopped(*a, **k):
        raise KeyboardInterrupt  # stopped after the old outputs went, before the embedding was trained

    monkeypatch.setattr(attack, "_invert", stopped)
    with pytest.raises(KeyboardInterrupt):
        main(parse_args(attack_args(tiny_pipeline, copy, "--unet_path", summary["unet_path"], "--overwrite_output_dir")))
    assert not (copy / "learned_embeds.safetensors").exists()  # a resume without the flag trains a new one
