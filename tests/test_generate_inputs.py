"""What generate.py takes and refuses: erased U-Nets (folder, erasure file, checkpoint), tokenizer and text encoder
folders, the default output folder, and bad input (one line, nothing written)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel

from cli_util import run_entry
from gen_util import STEPS, assert_same_images, generate, metadata, pixels, pngs
from generate import main, parse_args
from utils.cli import UserError
from utils.gen.pipelines import default_image_dir
from utils.saving import save_erasure
from utils.families.tiny import tiny_unet

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def erased(tiny_pipeline, tmp_path_factory) -> tuple[Path, Path]:
    """The tiny U-Net with its attn2 weights perturbed, as an erasure file and as a U-Net folder."""
    folder = tmp_path_factory.mktemp("erased")
    unet = UNet2DConditionModel.from_pretrained(tiny_pipeline / "unet")
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        trained = {k: p.add_(torch.randn(p.shape, generator=gen)) for k, p in unet.named_parameters() if ".attn2." in k}
    save_erasure(folder / "erasure.safetensors", trained,
                 {"base_model": str(tiny_pipeline), "method": "sdd", "concepts": ["nudity"]})
    unet.save_pretrained(folder / "unet")
    return folder / "erasure.safetensors", folder / "unet"


def test_unet_path_file_and_folder(tiny_pipeline, prompt_csv, reference, erased, tmp_path):
    for kind, path in zip(("file", "folder"), erased):
        generate(tiny_pipeline, prompt_csv, tmp_path / kind, "--end", "2", "--unet_path", str(path))
        assert list(metadata(tmp_path / kind)["unet"]) == [str(path)] * 2
    assert_same_images(tmp_path / "file", tmp_path / "folder")  # the same weights either way
    assert not np.array_equal(pixels(reference / "00000_0.png"), pixels(tmp_path / "file" / "00000_0.png"))
    # and with another mode
    generate(tiny_pipeline, prompt_csv, tmp_path / "sld", "--end", "1", "--unet_path", str(erased[0]),
             "--pipeline_type", "sld", "--pipeline_config", "weak")
    assert_same_images(tmp_path / "file", tmp_path / "sld", ["00000_0.png"])


def test_weights_changed_in_place_are_other_settings(tiny_pipeline, prompt_csv, erased, tmp_path):
    """A U-Net retrained into the same folder is not taken for the one that made the images there."""
    import shutil

    unet = shutil.copytree(erased[1], tmp_path / "unet")
    out = tmp_path / "out"
    generate(tiny_pipeline, prompt_csv, out, "--end", "1", "--unet_path", str(unet))
    assert generate(tiny_pipeline, prompt_csv, out, "--end", "1", "--unet_path", str(unet))["skipped"] == 1
    from safetensors.torch import load_file, save_file

    from utils.saving import weights_digest

    digest, weights = weights_digest(unet), unet / "diffusion_pytorch_model.safetensors"
    save_file(load_file(weights), weights, metadata={"format": "pt", "note": "saved again"})  # same tensors
    assert weights_digest(unet) == digest
    run = tmp_path / "run"  # a training run's folder given as --unet_path: only its unet/ counts
    shutil.copytree(unet, run / "unet")
    before = weights_digest(run)
    (run / "checkpoint-1").mkdir()
    (run / "checkpoint-1" / "state.pt").write_bytes(b"x")
    (run / "erasure-lora-r4.safetensors").write_text("version https://git-lfs.github.com/spec/v1\n")  # not weights
    assert weights_digest(run) == before and weights_digest(run / "erasure-lora-r4.safetensors")  # no crash
    shutil.copy(tiny_pipeline / "unet" / "diffusion_pytorch_model.safetensors", unet)  # "retrained"
    with pytest.raises(UserError, match="other settings .*weights_sha256"):
        generate(tiny_pipeline, prompt_csv, out, "--end", "1", "--unet_path", str(unet))


def bad_unet_folder(tmp_path: Path) -> Path:
    """A U-Net whose cross-attention width does not fit the tiny text encoder."""
    tiny_unet(cross_attention_dim=16).save_pretrained(tmp_path / "other-unet")
    return tmp_path / "other-unet"


def bad_erasure_file(tmp_path: Path) -> Path:
    """An erasure file with a tensor of the wrong shape."""
    name = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"
    meta = {"base_model": "x", "method": "sdd", "concepts": []}
    save_erasure(tmp_path / "bad.safetensors", {name: torch.zeros(3, 3)}, meta)
    return tmp_path / "bad.safetensors"


@pytest.mark.parametrize("case,flags,message", [
    ("missing prompts", ["--prompt_path", "{tmp}/nope.txt"], "does not exist"),
    ("no prompt column", ["--prompt_path", "{tmp}/noprompt.csv"], "no `prompt` column"),
    ("empty prompts", ["--prompt_path", "{tmp}/empty.txt"], "holds no prompts"),
    ("config of another mode", ["--pipeline_type", "sd", "--pipeline_config", "max"], "does not exist for"),
    ("range selects nothing", ["--start", "4"], "select none"),
    ("not a U-Net", ["--unet_path", "{tmp}/noprompt.csv"], "not a safetensors erasure file"),
    ("empty folder", ["--unet_path", "{tmp}"], "is not a diffusers U-Net folder"),
    ("missing unet", ["--unet_path", "{tmp}/nope"], "does not exist"),
    ("U-Net of another model", ["--unet_path", "{bad_unet}"], "does not fit"),
    ("erasure of another model", ["--unet_path", "{bad_erasure}"], "does not fit"),
    ("broken checkpoint", ["--unet_path", "{tmp}/checkpoint-5"], "is not a checkpoint of train_sdd.py"),
    ("text encoder of another model", ["--text_encoder_path", f"{ROOT}/assets/toy-sd/text_encoder"],
     "gives 64-wide embeddings, but the U-Net's cross-attention takes 32"),
    ("odd size", ["--height", "15"], "multiples of 2"),
])
def test_bad_input_writes_nothing(tiny_pipeline, prompt_csv, tmp_path, case, flags, message):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    (inputs / "noprompt.csv").write_text("text\na cat\n")
    (inputs / "empty.txt").write_text("\n\n")
    (inputs / "checkpoint-5").mkdir()
    (inputs / "checkpoint-5" / "state.pt").write_text("not a torch file")
    subs = {"tmp": str(inputs), "bad_unet": str(bad_unet_folder(tmp_path)) if "U-Net of" in case else "",
            "bad_erasure": str(bad_erasure_file(tmp_path)) if "erasure of" in case else ""}
    flags = [f.format(**subs) for f in flags]
    if "--prompt_path" not in flags:
        flags = ["--prompt_path", str(prompt_csv), *flags]
    out = tmp_path / "out"
    with pytest.raises(UserError, match=message):
        main(parse_args(["--pretrained_model_name_or_path", str(tiny_pipeline), "--image_dir", str(out), *flags]))
    assert not out.exists()


def test_mistyped_local_model_path(tmp_path, monkeypatch, prompt_csv):
    monkeypatch.chdir(ROOT)  # assets/ exists here, assets/no-such-model does not: a path or a hub id?
    with pytest.raises(UserError) as e:
        main(parse_args(["--pretrained_model_name_or_path", "assets/no-such-model", "--prompt_path", str(prompt_csv),
                         "--image_dir", str(tmp_path / "out")]))
    assert str(e.value).startswith("'assets/no-such-model' is neither an existing folder nor a reachable Hugging "
                                   "Face hub id") and "folders in assets/: toy-sd" in str(e.value)
    assert not (tmp_path / "out").exists()


def test_argparse_error_is_three_lines(capsys):
    with pytest.raises(SystemExit) as e:
        parse_args(["--prompt_path", "p.txt", "--pipeline_type", "nope"])
    assert e.value.code == 2
    prog = Path(sys.argv[0]).name  # generate.py when run as a script
    usage, error, see = capsys.readouterr().err.splitlines()
    assert usage == f"usage: {prog} --prompt_path PROMPT_PATH [options]" and see == f"see: {prog} --help"
    assert error.startswith("error: argument --pipeline_type: invalid choice: 'nope' (choose from ")


def test_help_prints_only_the_help():
    proc = subprocess.run([sys.executable, str(ROOT / "generate.py"), "--help"], cwd=ROOT, capture_output=True,
                          text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=120)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr  # no transformers notices on import
    assert proc.stdout.startswith("usage: generate.py") and "transformers" not in proc.stdout


def test_cli_error_is_one_line(tmp_path, monkeypatch, capsys):
    """Through generate.py's entry point (cli.run) in this process: test_help_prints_only_the_help starts a real one."""
    code, stderr = run_entry(monkeypatch, capsys, "generate.py", main, parse_args,
                             ["--prompt_path", str(tmp_path / "nope.csv"), "--image_dir", str(tmp_path / "out")])
    assert code == 2
    assert "Traceback" not in stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: prompt file {tmp_path / 'nope.csv'} does not exist"]
    assert not (tmp_path / "out").exists()


def test_default_image_dir(tiny_pipeline, prompt_csv, erased, tmp_path, monkeypatch, capsys):
    assert default_image_dir("prompts/country_body.txt", "CompVis/stable-diffusion-v1-4", None, "sld", "max") == \
        Path("outputs/country_body/stable-diffusion-v1-4_sld-max")
    for unet in ("outputs/sdd-nudity/unet", "outputs/sdd-nudity/unet/", "outputs/sdd-nudity/erasure.safetensors"):
        assert default_image_dir("i2p 4703.csv", "x", unet, "sd", "none") == Path("outputs/i2p-4703/sdd-nudity_sd-none")
    assert default_image_dir("a.txt", "x", "outputs/sdd-nudity/checkpoint-300/", "sd", "none") == \
        Path("outputs/a/sdd-nudity-checkpoint-300_sd-none")
    monkeypatch.chdir(tmp_path)
    main(parse_args(["--pretrained_model_name_or_path", str(tiny_pipeline), "--prompt_path", str(prompt_csv),
                     "--num_inference_steps", STEPS, "--end", "1", "--unet_path", str(erased[1])]))
    out = Path("outputs") / "prompts" / f"{erased[1].parent.name}_sd-none"
    assert pngs(out) == ["00000_0.png"] and f"images go to {out} (--image_dir)" in capsys.readouterr().out


def test_tokenizer_and_text_encoder_paths(tiny_pipeline, prompt_csv, reference, tmp_path):
    generate(tiny_pipeline, prompt_csv, tmp_path / "same", "--end", "2", "--tokenizer_path",
             str(tiny_pipeline / "tokenizer"), "--text_encoder_path", str(tiny_pipeline / "text_encoder"))
    assert_same_images(reference, tmp_path / "same", ["00000_0.png", "00001_0.png"])
    with pytest.raises(UserError, match="--text_encoder_path .* is not a folder"):
        generate(tiny_pipeline, prompt_csv, tmp_path / "bad", "--text_encoder_path", str(tmp_path / "nope"))
