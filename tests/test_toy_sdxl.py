"""The toy world in SDXL's shape (`python -m utils.toy train --family sdxl`): a few steps give a pipeline folder that
the sdxl family takes and the toy measurement loads and judges; the sd family's toy is built as before."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from toy_util import assert_conditioned_as_sdxl_family  # noqa: E402
from utils.toy import measure as M  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHIPPED_XL = ROOT / "assets" / "toy-sdxl"
FLAGS = ["--n_images", "48", "--vae_steps", "2", "--unet_steps", "3", "--vae_batch_size", "4", "--unet_batch_size", "4",
         "--quiet"]


@pytest.fixture(scope="module")
def toy_xl(tmp_path_factory):
    """A few steps of `python -m utils.toy train --family sdxl`."""
    from utils.toy.cli import main, parse_args

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("toyxl") / "toy"
    try:
        main(parse_args(["train", "--family", "sdxl", "--output_dir", str(out), *FLAGS]))
    finally:
        torch.set_num_threads(old)
    return out


def test_sdxl_toy_is_an_sdxl_pipeline_in_the_sd_toys_proportions(toy_xl):
    from utils.families import family_of

    assert family_of(str(toy_xl)).name == "sdxl"
    assert (toy_xl / "sampling_defaults.json").is_file() and (toy_xl / "train_toy.log").is_file()
    assert not (toy_xl / "checkpoints").exists()
    pipe = M.load_pipeline(toy_xl)
    assert type(pipe).__name__ == "StableDiffusionXLPipeline"
    assert not pipe.config.force_zeros_for_empty_prompt  # the empty prompt is encoded, as in training
    unet, te1, te2 = pipe.unet.config, pipe.text_encoder.config, pipe.text_encoder_2.config
    assert unet.addition_embed_type == "text_time" and unet.cross_attention_dim == te1.hidden_size + te2.hidden_size
    assert unet.projection_class_embeddings_input_dim == 6 * unet.addition_time_embed_dim + te2.projection_dim
    assert pipe.scheduler.config.prediction_type == "v_prediction" and pipe.scheduler.config.rescale_betas_zero_snr
    assert "params: text_encoder " in (toy_xl / "train_toy.log").read_text()


def test_sdxl_toy_is_conditioned_in_training_as_the_family_encodes_it(toy_xl):
    """The trainer's conditioning (utils.toy.models.conditioner) is the sdxl family's encode (erasure's) exactly."""
    from utils.families import FAMILIES
    from utils.toy.models import ToyModules, conditioner

    parts = FAMILIES["sdxl"].load(str(toy_xl))
    modules = ToyModules("sdxl", {"text_encoder": parts.text_encoder, "text_encoder_2": parts.text_encoder_2},
                         parts.vae, parts.unet)
    assert_conditioned_as_sdxl_family(toy_xl, ["a red circle", "an apple", ""], conditioner(modules))


def test_compare_loads_and_judges_an_sdxl_toy(toy_xl, tmp_path, one_thread):
    from utils.toy.cli import main, parse_args

    res = main(parse_args(["compare", "--base", str(toy_xl), "--unet", str(toy_xl / "unet"), "--concepts", "red",
                           "--n_per_prompt", "1", "--steps", "2", "--output", str(tmp_path / "c.png")]))
    assert set(res["preserved"]) == {"orange", "yellow", "green", "blue", "purple"}
    assert (tmp_path / "c.png").is_file() and (tmp_path / "c.json").is_file()
    # the same U-Net on both sides: every image is drawn the same, seed for seed
    assert res["drawn_before"] == res["drawn_after"]


def test_sd_family_builds_the_shipped_toys_modules_as_before(tmp_path):
    """`--family sd` (the default) creates the very weights the code before the family seam created."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from utils.toy.models import build, conditioner
    from utils.toy.train import build_models, make_tokenizer

    tok = make_tokenizer(tmp_path / "tok")
    torch.manual_seed(3)  # the pre-seam builder, verbatim
    te = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=tok.model_max_length, projection_dim=64, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        layers_per_block=1, norm_num_groups=8, sample_size=32)
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=64, attention_head_dim=4, norm_num_groups=8)
    m = build("sd", tok, 3)
    assert list(m.trained_with_unet()) == ["unet", "text_encoder"]  # the optimizer's parameter order
    for old, new in ((te, m.text_encoders["text_encoder"]), (vae, m.vae), (unet, m.unet)):
        assert old.config == new.config
        a, b = old.state_dict(), new.state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert all(torch.equal(x, y) for x, y in zip(build_models(tok, 3)[2].parameters(), unet.parameters()))
    ids = tok(["a red circle"], padding="max_length", max_length=tok.model_max_length, return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(conditioner(m)(ids)["encoder_hidden_states"], te(ids)[0])


@pytest.mark.skipif(not (SHIPPED_XL / "model_index.json").exists(), reason="assets/toy-sdxl not trained yet")
def test_shipped_toy_sdxl_is_sdxl_and_records_its_recipe():
    import ast

    from utils.families import family_of
    from utils.toy.cli import parse_args

    assert family_of(str(SHIPPED_XL)).name == "sdxl"
    logged = ast.literal_eval((SHIPPED_XL / "train_toy.log").read_text().splitlines()[0].split("train: ", 1)[1])
    defaults = vars(parse_args(["train", "--family", "sdxl"]))
    ignored = {"output_dir", "keep_checkpoints", "quiet", "threads", "checkpoint_every", "overwrite"}
    assert {k: v for k, v in logged.items() if k not in ignored} == \
        {k: defaults[k] for k in logged if k not in ignored}
