"""Toy 3 in SDXL's shape (`python -m utils.toy train --family sdxl --recipe toy3`): two text encoders, each learned in a
contrastive phase of its own and frozen (text_encoder_2 through its own projection, the pooled embedding), a
StableDiffusionXLPipeline folder that the toy measurement draws from; toy 2's SDXL modules are built as before."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from toy_util import assert_conditioned_as_sdxl_family  # noqa: E402
from utils.toy import measure as M  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--n_images", "64", "--vae_steps", "1", "--clip_steps", "2", "--unet_steps", "2", "--clip_batch_size", "16",
        "--unet_batch_size", "8", "--quiet", "--threads", "1"]
# sha256 (first 16 hex digits) of the initial weights, computed on the code before toy 3 could train the sdxl family:
# build("sdxl", tokenizer, 2), the shipped assets/toy-sdxl's start, and build_sd's toy 3 modules at seed 2
TOY2_SDXL_SEED2 = "788b098da33f88d3"
TOY3_SD_SEED2 = "18615ea6f955d537"


def _digest(*modules: torch.nn.Module) -> str:
    """A checksum of the modules' state dicts: names, shapes and bytes."""
    h = hashlib.sha256()
    for mod in modules:
        for k, v in sorted(mod.state_dict().items()):
            h.update(k.encode()), h.update(str(tuple(v.shape)).encode())
            h.update(v.detach().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _all(m) -> tuple[torch.nn.Module, ...]:
    return (*m.text_encoders.values(), m.vae, m.unet)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from utils.toy.train import make_tokenizer

    return make_tokenizer(tmp_path_factory.mktemp("tok"))


def _built(tok, *flags: str):
    """The fresh modules `python -m utils.toy train FLAGS` starts from."""
    from utils.toy.cli import parse_args
    from utils.toy.train import build_for

    return build_for(parse_args(["train", *flags]), tok)


# ------------------------------------------------------------------------------------------------ the build
def test_toy2_sdxl_and_toy3_sd_build_the_same_weights_as_before(tok, one_thread):
    from utils.toy.models import build

    assert _digest(*_all(build("sdxl", tok, 2))) == TOY2_SDXL_SEED2
    assert _digest(*_all(_built(tok, "--family", "sdxl"))) == TOY2_SDXL_SEED2  # the flags' path: seed 2, recipe toy2
    assert _digest(*_all(_built(tok, "--recipe", "toy3"))) == TOY3_SD_SEED2


def test_sdxl_toy3_builds_two_half_width_encoders_and_a_clip_dim_pooled_projection(tok, one_thread):
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from utils.toy.cli import parse_args
    from utils.toy.contrastive import ClipHeads, text_embeddings

    args = parse_args(["train", "--family", "sdxl", "--recipe", "toy3", "--vae_from", "assets/toy-sd"])
    assert args.output_dir == "outputs/toy3-sdxl" and args.text_encoder == "contrastive" and args.clip_dim == 64
    m = _built(tok, "--family", "sdxl", "--recipe", "toy3")
    te1, te2 = m.text_encoders["text_encoder"], m.text_encoders["text_encoder_2"]
    assert type(te1) is CLIPTextModel and type(te2) is CLIPTextModelWithProjection
    for te in (te1, te2):  # 128 + 128 = 256, toy 3's width; 3 layers (penultimate read), heads 16 wide
        c = te.config
        assert (c.hidden_size, c.num_hidden_layers, c.hidden_size // c.num_attention_heads) == (128, 3, 16)
    assert te2.text_projection.weight.shape == (64, 128) and te2.text_projection.bias is None
    u = m.unet.config
    assert u.cross_attention_dim == 256 and list(u.down_block_types) == ["CrossAttnDownBlock2D"] * 2
    assert u.addition_embed_type == "text_time" and u.projection_class_embeddings_input_dim == 6 * 8 + 64
    assert m.frozen_text and list(m.trained_with_unet()) == ["unet"]
    # text_encoder_2's contrastive embedding is its own projected pooled state, the one the U-Net reads
    heads = ClipHeads(128, 64, own_projection=False)
    assert heads.text_projection is None and not any("text_projection" in k for k in heads.state_dict())
    ids = tok(["an orange circle", "red"], padding="max_length", max_length=tok.model_max_length,
              return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(text_embeddings(te2, heads, ids), te2(ids).text_embeds)
    # another --clip_dim is the pooled width; toy 2's flags on another layout train too
    assert _built(tok, "--family", "sdxl", "--recipe", "toy3", "--clip_dim", "32").unet.config \
        .projection_class_embeddings_input_dim == 6 * 8 + 32
    assert parse_args(["train", "--family", "sdxl", "--attention", "all"]).output_dir == "outputs/toy-sdxl"


# ------------------------------------------------------------------------------------------------ a tiny run
@pytest.fixture(scope="module")
def xl3(tmp_path_factory):
    """A few steps of `python -m utils.toy train --family sdxl --recipe toy3 --vae_from assets/toy-sd`, with its
    fresh and its trained modules."""
    import utils.toy.train as T
    from utils.toy.cli import main, parse_args

    out, seen = tmp_path_factory.mktemp("toy3xl") / "toy", {}

    def build_for(args, tokenizer):
        seen["m"] = m = build(args, tokenizer)
        seen["fresh"] = {k: {n: v.clone() for n, v in te.state_dict().items()} for k, te in m.text_encoders.items()}
        return m

    build, old = T.build_for, torch.get_num_threads()
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(T, "build_for", build_for)
            main(parse_args(["train", "--family", "sdxl", "--recipe", "toy3", "--vae_from", str(ROOT / "assets/toy-sd"),
                             "--output_dir", str(out), "--keep_checkpoints", *TINY]))
    finally:
        torch.set_num_threads(old)
    return out, seen["m"], seen["fresh"]


def test_each_encoder_moves_in_its_own_phase_and_stays_frozen_after(xl3):
    from safetensors.torch import load_file

    out, m, fresh = xl3
    ck = out / "checkpoints"
    for name, te in m.text_encoders.items():
        state = torch.load(ck / name / "checkpoint-2" / "state.pt", weights_only=False)
        assert set(state["modules"]) == {name, "clip_heads"}  # its phase trains it and its own heads only
        assert ("text_projection.weight" in state["modules"]["clip_heads"]) == (name == "text_encoder")
        ended = state["modules"][name]
        assert any(not torch.equal(fresh[name][k], v) for k, v in ended.items())  # it moved in its phase
        if name == "text_encoder_2":  # through its own projection
            assert not torch.equal(fresh[name]["text_projection.weight"], ended["text_projection.weight"])
        # frozen: out of every optimizer since, bit for bit as its phase ended, in memory and in the saved folder
        assert not any(p.requires_grad for p in te.parameters())
        saved = load_file(out / name / "model.safetensors")
        assert all(torch.equal(te.state_dict()[k], v) and torch.equal(saved[k], v) for k, v in ended.items())
    unet_state = torch.load(ck / "unet" / "checkpoint-2" / "state.pt", weights_only=False)
    assert set(unet_state["modules"]) == {"unet"}
    assert sum(len(g["params"]) for g in unet_state["opt"]["param_groups"]) == len(list(m.unet.parameters()))
    log = (out / "train_toy.log").read_text()
    assert "text encoder trained (contrastive) and frozen" in log and "text encoder 2 trained (contrastive)" in log


def test_sdxl_toy3_folder_is_an_sdxl_pipeline_conditioned_as_trained_and_measured(xl3, one_thread):
    from utils.families import family_of
    from utils.toy.models import conditioner
    from utils.toy.train import _rows

    out, m, _ = xl3
    assert family_of(str(out)).name == "sdxl" and M.uses_an(out) and (out / "sampling_defaults.json").is_file()
    pipe = M.load_pipeline(out)
    assert type(pipe).__name__ == "StableDiffusionXLPipeline" and not pipe.config.force_zeros_for_empty_prompt
    assert pipe.text_encoder_2.config.projection_dim == 64 and pipe.unet.config.cross_attention_dim == 256
    s = pipe.scheduler.config
    assert s.prediction_type == "epsilon" and not s.rescale_betas_zero_snr and s.timestep_spacing == "leading"
    # the U-Net phase's cached conditioning (frozen encoders) is the family's encode of the saved folder
    assert_conditioned_as_sdxl_family(out, ["an orange circle", "an apple", ""],
                                      lambda ids: _rows(conditioner(m)(ids), torch.tensor([2, 0, 1])), [1, 2, 0])
    items = [it for it in M.quality_items(n=1, seed=0, colours=["orange"], an=True) if it.shape == "circle"][:2]
    assert items[0].prompt == "an orange circle"
    res = M.quality(items, M.draw(pipe, items, num_inference_steps=2))
    assert set(res["rate"]["explicit"]) == {"orange"}
