"""The sdxl family on a tiny StableDiffusionXLPipeline built in code: training (SDD, ESD), the empty prompt's
condition, resume, the erasure file and a LoRA in diffusers' SDXL pipeline, generation, and refused checkpoints."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import train_esd
import train_sdd
from gen_util import assert_same_images, generate, pixels, pngs
from train_util import moved
from utils.cli import UserError
from utils.families import FAMILIES, family_of
from utils.families.tiny import build_tiny_sdxl_pipeline
from utils.lora import export_lora
from utils.train.loop import Run

pytestmark = pytest.mark.usefixtures("one_thread")
FAST = ["--num_train_steps", "3", "--num_ddim_steps", "4", "--device", "cpu", "--learning_rate", "1e-3", "--threads", "1"]


@pytest.fixture(scope="module")
def xl(tmp_path_factory) -> Path:
    """A tiny SDXL pipeline folder (two text encoders, pooled embedding, time ids; Euler scheduler)."""
    return build_tiny_sdxl_pipeline(tmp_path_factory.mktemp("tiny-xl") / "pipe")


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("xl-prompts") / "prompts.txt"
    path.write_text("a red circle\na photo of a cat\nnudity\n", encoding="utf-8")
    return path


def xl_args(module, pipe: Path, out: Path, *extra: str):
    return module.parse_args(["--pretrained_model_name_or_path", str(pipe), "--output_dir", str(out),
                              "--removing_concepts", "nudity", *FAST, *extra])


def test_the_family_is_read_from_model_index(xl, tiny_pipeline):
    assert family_of(str(xl)).name == "sdxl" and family_of(str(tiny_pipeline)).name == "sd"


@pytest.mark.parametrize("module", [train_sdd, train_esd], ids=["sdd", "esd"])
def test_training_moves_only_cross_attention(xl, tmp_path, module):
    out = module.main(xl_args(module, xl, tmp_path / "o", "--validation_prompts", "a red circle",
                              "--validation_steps", "2", "--num_validation_images", "1"))
    changed = moved(xl, out)
    assert changed and all(".attn2." in k for k in changed)
    assert (out / "validation" / "step-2.png").exists() and (out / "erasure.safetensors").exists()


def test_condition_has_pooled_embedding_and_time_ids_at_the_training_resolution(xl, tmp_path):
    run = Run(xl_args(train_sdd, xl, tmp_path / "o", "--resolution", "32"), train_sdd.SDD)
    cond = run.embeds["nudity"]
    assert cond.hidden.shape[-1] == 64 and cond.extra["text_embeds"].shape == (1, 32)
    assert cond.extra["time_ids"].tolist() == [[32, 32, 0, 0, 32, 32]]
    assert run.latent_shape == (4, 16, 16)


def test_empty_prompt_zeros_changes_the_target_and_only_that(xl, tmp_path):
    runs = {how: Run(xl_args(train_sdd, xl, tmp_path / how, "--empty_prompt", how), train_sdd.SDD)
            for how in ("encoded", "zeros")}
    enc, zero = runs["encoded"].embeds, runs["zeros"].embeds
    assert enc[""].hidden.abs().sum() > 0 and enc[""].extra["text_embeds"].abs().sum() > 0
    assert zero[""].hidden.abs().sum() == 0 and zero[""].extra["text_embeds"].abs().sum() == 0
    assert torch.equal(zero[""].extra["time_ids"], enc[""].extra["time_ids"])  # the size is still the image's
    assert torch.equal(zero["nudity"].hidden, enc["nudity"].hidden)  # the removed concept's condition is the same
    losses = [runs[how].train_step()[0] for how in ("encoded", "zeros")]
    assert losses[0] != losses[1]


def test_resume_refuses_a_changed_empty_prompt(xl, tmp_path):
    out = tmp_path / "o"
    train_sdd.main(xl_args(train_sdd, xl, out, "--checkpointing_steps", "2", "--num_train_steps", "2"))
    shutil.rmtree(out / "unet")
    (out / "erasure.safetensors").unlink()
    with pytest.raises(UserError, match="--empty_prompt"):
        train_sdd.main(xl_args(train_sdd, xl, out, "--num_train_steps", "4", "--resume_from_checkpoint", "latest",
                               "--empty_prompt", "zeros"))


def test_erasure_file_and_full_rank_lora_give_the_saved_unets_images(xl, prompts, tmp_path):
    out = train_esd.main(xl_args(train_esd, xl, tmp_path / "o"))
    common = ["--height", "32", "--width", "32"]
    generate(xl, prompts, tmp_path / "unet", "--unet_path", str(out / "unet"), *common)
    generate(xl, prompts, tmp_path / "file", "--unet_path", str(out / "erasure.safetensors"), *common)
    assert_same_images(tmp_path / "unet", tmp_path / "file")
    lora = export_lora(out / "erasure.safetensors", rank="full", save_precision="fp32")
    # generate.py's --lora_path loads it into StableDiffusionXLPipeline with load_lora_weights
    generate(xl, prompts, tmp_path / "lora", "--lora_path", lora["path"], *common)
    for name in pngs(tmp_path / "unet"):
        diff = np.abs(pixels(tmp_path / "unet" / name).astype(int) - pixels(tmp_path / "lora" / name).astype(int))
        assert (diff > 1).mean() < 0.005, name


def test_generation_is_seeded_and_resumes(xl, prompts, tmp_path):
    for config in ("none", "neg"):
        a, b = tmp_path / f"a-{config}", tmp_path / f"b-{config}"
        flags = ["--pipeline_config", config, "--height", "32", "--width", "32"]
        generate(xl, prompts, a, *flags)
        generate(xl, prompts, b, *flags)
        assert_same_images(a, b)
        first = pngs(b)[0]
        (b / first).unlink()
        summary = generate(xl, prompts, b, *flags)
        assert summary["written"] == 1 and summary["skipped"] == len(pngs(a)) - 1
        assert_same_images(a, b)
    assert not np.array_equal(pixels(tmp_path / "a-none" / first), pixels(tmp_path / "a-neg" / first))


@pytest.mark.parametrize("mode", ["sld", "sega"])
def test_sld_and_sega_refuse_before_loading(xl, prompts, tmp_path, mode):
    with pytest.raises(UserError, match=f"{mode} exists only for SD 1.x/2.x"):
        generate(xl, prompts, tmp_path / "o", "--pipeline_type", mode)
    assert not any((tmp_path / "o").glob("*.png"))


@pytest.mark.parametrize("cls,what", [("StableDiffusionXLImg2ImgPipeline", "refiner"),
                                      ("StableDiffusionXLInpaintPipeline", "inpainting")])
def test_refiner_and_inpainting_checkpoints_are_refused(xl, tmp_path, cls, what):
    other = tmp_path / "other"
    shutil.copytree(xl, other)
    index = json.loads((other / "model_index.json").read_text())
    (other / "model_index.json").write_text(json.dumps({**index, "_class_name": cls}))
    with pytest.raises(UserError, match=what):
        train_sdd.main(xl_args(train_sdd, other, tmp_path / "o"))
    assert not (tmp_path / "o").exists()


def test_a_unet_of_another_family_is_refused(xl, tiny_pipeline, prompts, tmp_path):
    with pytest.raises(UserError, match="does not fit"):
        generate(xl, prompts, tmp_path / "o", "--unet_path", str(tiny_pipeline / "unet"))
    with pytest.raises(UserError, match="not an SDXL U-Net"):
        FAMILIES["sdxl"].load_unet(str(tiny_pipeline))


def test_evaluation_of_an_sdxl_folder_names_the_family(xl, tiny_pipeline, prompts, tmp_path):
    import evaluate

    for name, model in (("xl", xl), ("sd", tiny_pipeline)):
        generate(model, prompts, tmp_path / name, "--height", "32", "--width", "32")
        evaluate.main(evaluate.parse_args(["toy", str(tmp_path / name)]))
    res = evaluate.main(evaluate.parse_args(["report", "--runs", f"XL={tmp_path / 'xl'}", f"SD={tmp_path / 'sd'}",
                                             "--output_dir", str(tmp_path / "report")]))
    assert list(res["table"]["model_family"]) == ["sdxl", "sd"]
    assert "| Method | Model |" in res["markdown"] and "| XL | sdxl |" in res["markdown"]


def test_text_subset_also_trains_the_pooled_embedding_and_exports_as_a_lora(xl, prompts, tmp_path):
    out = train_esd.main(xl_args(train_esd, xl, tmp_path / "o", "--finetuning_method", "text"))
    changed = moved(xl, out)
    assert any(k.startswith("add_embedding.") for k in changed) and any(".attn2." in k for k in changed)
    assert all(".attn2." in k or k.startswith("add_embedding.") for k in changed)
    common = ["--height", "32", "--width", "32"]
    generate(xl, prompts, tmp_path / "unet", "--unet_path", str(out / "unet"), *common)
    lora = export_lora(out / "erasure.safetensors", rank="full", save_precision="fp32")
    generate(xl, prompts, tmp_path / "lora", "--lora_path", lora["path"], *common)
    for name in pngs(tmp_path / "unet"):
        diff = np.abs(pixels(tmp_path / "unet" / name).astype(int) - pixels(tmp_path / "lora" / name).astype(int))
        assert (diff > 1).mean() < 0.005, name
