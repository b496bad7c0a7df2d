"""utils/lora.py on tiny pipelines: SVD export, diffusers' load_lora_weights round trip, generate.py --lora_path,
train_*.py --export_lora_rank, and bad input."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import generate
import train_esd
from utils.cli import UserError
from utils.lora import PREFIX, apply_loras, export_lora, low_rank, main as lora_main, parse_args as lora_args
from cli_util import run_entry
from train_util import make_erasure
from utils.saving import apply_erasure, save_erasure
from utils.families.tiny import tiny_unet

ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")


def unet_output(unet: torch.nn.Module) -> torch.Tensor:
    """The U-Net's noise estimate on fixed random inputs."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=gen)
    c = torch.randn(2, 16, 32, generator=gen)
    with torch.no_grad():
        return unet(x, 500, encoder_hidden_states=c).sample


def lora_pipeline(base: Path, *loras: tuple[Path, float]) -> StableDiffusionPipeline:
    """The base pipeline with LoRAs loaded through diffusers' load_lora_weights."""
    pipe = StableDiffusionPipeline.from_pretrained(base, safety_checker=None, requires_safety_checker=False)
    apply_loras(pipe, [(str(p), s) for p, s in loras])
    return pipe


def erased_unet(base: Path, *erasures: Path) -> UNet2DConditionModel:
    """The base U-Net plus the delta of each erasure file."""
    unet = UNet2DConditionModel.from_pretrained(base / "unet")
    start = {n: p.detach().clone() for n, p in unet.named_parameters()}
    total = {n: torch.zeros_like(p) for n, p in start.items()}
    for path in erasures:
        apply_erasure(unet, path)
        with torch.no_grad():
            for n, p in unet.named_parameters():
                total[n] += p - start[n]
                p.copy_(start[n])
    with torch.no_grad():
        for n, p in unet.named_parameters():
            p += total[n]
    return unet


def test_low_rank_picks_rank_by_energy_and_reconstructs():
    u, _ = torch.linalg.qr(torch.randn(6, 6, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(4, 4, dtype=torch.float64))
    delta = (u[:, :4] * torch.tensor([3.0, 2.0, 1.0, 0.0], dtype=torch.float64)) @ v.T  # energies 9, 4, 1, 0
    assert low_rank(delta.float(), None, 0.6)[0].shape[0] == 1            # 9/14 = 0.64
    assert low_rank(delta.float(), None, 0.9)[0].shape[0] == 2            # 13/14 = 0.93
    down, up, kept = low_rank(delta.float(), 1, 0.9)                      # --rank caps --energy
    assert down.shape == (1, 4) and up.shape == (6, 1) and kept == pytest.approx(9 / 14)
    down, up, kept = low_rank(delta.float(), None, None)
    assert kept == pytest.approx(1.0) and torch.allclose(up @ down, delta.float(), atol=1e-5)
    conv = torch.randn(8, 3, 3, 3)
    down, up, _ = low_rank(conv, None, None)
    assert down.shape == (8, 3, 3, 3) and up.shape == (8, 8, 1, 1)
    assert torch.allclose((up.flatten(1) @ down.flatten(1)).reshape(conv.shape), conv, atol=1e-5)


@pytest.mark.parametrize("method", ["xattn", "noxattn"])
def test_full_rank_lora_loaded_by_diffusers_equals_the_merged_weights(tiny_pipeline, tmp_path, method):
    erasure = make_erasure(tiny_pipeline, tmp_path / "erasure.safetensors", method, biases=True)
    s = export_lora(erasure, rank="full", save_precision="fp32")
    assert Path(s["path"]) == tmp_path / "erasure-lora-rfull.safetensors"
    # left out: exactly the biases and norm weights; they carry some of the delta's energy
    assert s["left_out"] and all(n.endswith(".bias") or "norm" in n for n in s["left_out"])
    assert 0 < s["left_out_energy"] < 1 and s["retained_exported"] == pytest.approx(1.0)
    if method == "noxattn":
        assert any(k.startswith("Conv2d") for k in s["left_out_kinds"]) and any("conv" in m for m in s["ranks"])
    pipe = lora_pipeline(tiny_pipeline, (Path(s["path"]), 1.0))
    merged = erased_unet(tiny_pipeline, erasure)
    base = dict(UNet2DConditionModel.from_pretrained(tiny_pipeline / "unet").named_parameters())
    with torch.no_grad():
        for n, p in merged.named_parameters():
            if n in s["left_out"]:
                p.copy_(base[n])  # the merged weights the LoRA stands for
    lora_out, merged_out = unet_output(pipe.unet), unet_output(merged)
    assert (lora_out - merged_out).abs().max() < 1e-4
    assert (lora_out - unet_output(UNet2DConditionModel.from_pretrained(tiny_pipeline / "unet"))).abs().max() > 1e-2


def test_rank_energy_precision_and_metadata(tiny_pipeline, tmp_path):
    erasure = make_erasure(tiny_pipeline, tmp_path / "erasure.safetensors")
    merged = unet_output(erased_unet(tiny_pipeline, erasure))
    full = export_lora(erasure, rank="full", output=tmp_path / "full.safetensors")  # fp16, the default
    r1 = export_lora(erasure, rank=1, save_precision="fp32")
    e9 = export_lora(erasure, energy=0.9, save_precision="fp32")
    assert set(r1["ranks"].values()) == {1} and r1["retained_exported"] < e9["retained_exported"] < 1
    assert all(v >= 0.9 for v in e9["retained"].values())
    assert 1 < max(e9["ranks"].values()) < max(full["ranks"].values())
    errors = {}
    for name, s in [("full", full), ("r1", r1), ("e9", e9)]:
        errors[name] = (unet_output(lora_pipeline(tiny_pipeline, (Path(s["path"]), 1.0)).unet) - merged).abs().max()
    assert errors["full"] < 2e-3 < errors["e9"] < errors["r1"]  # fp16 costs little; truncation costs more
    with safe_open(str(e9["path"]), "pt") as f:
        meta, keys = f.metadata(), list(f.keys())
        alphas = {f.get_tensor(k).item() for k in keys if k.endswith(".alpha")}
        assert f.get_tensor(keys[0]).dtype == torch.float32
    assert all(k.startswith(PREFIX) and k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha")) for k in keys)
    assert alphas == {float(max(e9["ranks"].values()))}  # one alpha for all layers
    assert meta["base_model"] == str(tiny_pipeline) and meta["method"] == "esd" and "red circle" in meta["concepts"]
    assert meta["energy"] == "0.9" and json.loads(meta["ranks"]) == e9["ranks"]
    assert json.loads(meta["retained_energy"]).keys() == e9["ranks"].keys()
    assert Path(e9["path"]).name == "erasure-lora-e0.9.safetensors"
    assert e9["size_bytes"] < Path(full["path"]).stat().st_size * 2 and os.path.getsize(r1["path"]) < e9["size_bytes"]


def test_cli_prints_energy_and_size(tiny_pipeline, tmp_path, capsys):
    erasure = make_erasure(tiny_pipeline, tmp_path / "erasure.safetensors", biases=True)
    lora_main(lora_args([str(erasure), "--rank", "2"]))
    out = capsys.readouterr().out
    assert "erasure-lora-r2.safetensors" in out and "KiB" in out and "delta energy" in out
    assert "Linear.bias" in out  # what is left out, named


def test_a_base_of_the_same_shapes_but_other_weights_is_flagged(tiny_pipeline, tiny_vpred_pipeline, tmp_path, capsys):
    erasure = make_erasure(tiny_pipeline, tmp_path / "erasure.safetensors")
    export_lora(erasure, rank=1)
    assert "warning" not in capsys.readouterr().out
    export_lora(erasure, rank=1, base=str(tiny_vpred_pipeline), overwrite=True)  # another seed: other weights
    assert "the model it was trained from?" in capsys.readouterr().out


def test_two_loras_in_generate_equal_both_erasures_and_are_recorded(tiny_pipeline, tmp_path):
    a = make_erasure(tiny_pipeline, tmp_path / "a" / "erasure.safetensors", seed=1)
    b = make_erasure(tiny_pipeline, tmp_path / "b" / "erasure.safetensors", seed=2)
    la, lb = (export_lora(e, rank="full", save_precision="fp32")["path"] for e in (a, b))
    both = erased_unet(tiny_pipeline, a, b)
    save_erasure(tmp_path / "both.safetensors", {n: p for n, p in both.named_parameters() if ".attn2." in n},
                 {"base_model": str(tiny_pipeline), "method": "esd"})
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na green square\n")

    def run(out, *flags):
        return generate.main(generate.parse_args(["--pretrained_model_name_or_path", str(tiny_pipeline),
                                                  "--prompt_path", str(prompts), "--image_dir", str(out),
                                                  "--num_inference_steps", "2", "--device", "cpu", *flags]))
    run(tmp_path / "lora", "--lora_path", la, lb, "--lora_scale", "1", "1")
    run(tmp_path / "full", "--unet_path", str(tmp_path / "both.safetensors"))
    run(tmp_path / "base")
    for name in ("00000_0.png", "00001_0.png"):
        img = {k: np.asarray(Image.open(tmp_path / k / name), dtype=int) for k in ("lora", "full", "base")}
        assert np.abs(img["lora"] - img["full"]).max() <= 2 < np.abs(img["lora"] - img["base"]).max()
    meta = pd.read_csv(tmp_path / "lora" / "metadata.csv", dtype=str)
    assert list(meta["lora"]) == [f"{la} (1); {lb} (1)"] * 2
    assert json.loads((tmp_path / "lora" / "args.json").read_text())["lora_scale"] == [1.0, 1.0]
    with pytest.raises(UserError, match="other settings"):  # same folder, other LoRAs
        run(tmp_path / "lora", "--lora_path", la)


def other_base(tmp_path: Path) -> Path:
    """A 'pipeline' folder whose U-Net has another cross-attention width than the tiny pipeline's."""
    tiny_unet(cross_attention_dim=16).save_pretrained(tmp_path / "other" / "unet")
    return tmp_path / "other"


@pytest.mark.parametrize("case,message", [
    ("not safetensors", "not a safetensors erasure file"),
    ("a LoRA, not an erasure", "not an erasure file"),
    ("base of other shapes", "does not fit this U-Net"),
    ("output exists", "exists; pass --overwrite"),
])
def test_export_bad_input_writes_nothing(tiny_pipeline, tmp_path, case, message):
    erasure = make_erasure(tiny_pipeline, tmp_path / "erasure.safetensors")
    argv = [str(erasure), "--rank", "2"]
    if case == "not safetensors":
        (tmp_path / "x.safetensors").write_text("hello")
        argv[0] = str(tmp_path / "x.safetensors")
    elif case == "a LoRA, not an erasure":
        save_file({PREFIX + "x.lora_down.weight": torch.zeros(1, 2)}, str(tmp_path / "lora.safetensors"))
        argv[0] = str(tmp_path / "lora.safetensors")
    elif case == "base of other shapes":
        argv += ["--pretrained_model_name_or_path", str(other_base(tmp_path))]
    else:
        (tmp_path / "erasure-lora-r2.safetensors").write_text("keep me")
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(UserError, match=message):
        lora_main(lora_args(argv))
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    if case == "output exists":
        assert (tmp_path / "erasure-lora-r2.safetensors").read_text() == "keep me"


def test_cli_errors_are_one_line(tmp_path, monkeypatch, capsys):
    """The first as a real `python -m utils.lora` process; the second through the same entry point (cli.run) here."""
    from utils import lora

    for argv, message in [([str(tmp_path / "x.txt"), "--rank", "2"], "not a safetensors erasure file"),
                          ([str(tmp_path / "x.txt")], "give --rank")]:
        (tmp_path / "x.txt").write_text("hello")
        if "--rank" in argv:
            r = subprocess.run([sys.executable, "-m", "utils.lora", *argv], cwd=ROOT, capture_output=True, text=True,
                               env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}, timeout=300)
            code, stderr = r.returncode, r.stderr
        else:
            code, stderr = run_entry(monkeypatch, capsys, "python -m utils.lora", lora.main, lora.parse_args, argv)
        errors = [ln for ln in stderr.splitlines() if "error:" in ln]
        assert code == 2 and "Traceback" not in stderr and len(errors) == 1 and message in errors[0]
        assert sorted(p.name for p in tmp_path.iterdir()) == ["x.txt"]


@pytest.mark.parametrize("case,message", [
    ("LoRA of another base", "does not fit this U-Net"),
    ("scales do not match", "one value or one per --lora_path"),
    ("missing file", "is not a file"),
    ("not a LoRA", "could not load LoRA"),
    ("LoRA of another base, without our metadata", "could not load LoRA"),
])
def test_generate_bad_lora_is_one_line_and_writes_nothing(tiny_pipeline, tmp_path, case, message):
    if case.startswith("LoRA of another base,"):  # from another tool: diffusers' own error, said once
        base = other_base(tmp_path)
        unet = UNet2DConditionModel.from_pretrained(base / "unet")
        lora = export_lora(make_erasure(base, tmp_path / "e.safetensors", unet=unet), rank=2)["path"]
        save_file(load_file(lora), str(tmp_path / "foreign.safetensors"))
        flags = [str(tmp_path / "foreign.safetensors")]
    elif case == "LoRA of another base":
        base = other_base(tmp_path)
        unet = UNet2DConditionModel.from_pretrained(base / "unet")
        flags = [export_lora(make_erasure(base, tmp_path / "e.safetensors", unet=unet), rank=2)["path"]]
    elif case == "scales do not match":
        flags = [export_lora(make_erasure(tiny_pipeline, tmp_path / "e.safetensors"), rank=2)["path"],
                 "--lora_scale", "1", "0.5"]
    elif case == "missing file":
        flags = [str(tmp_path / "nope.safetensors")]
    else:
        save_file({"foo": torch.zeros(2)}, str(tmp_path / "foo.safetensors"))
        flags = [str(tmp_path / "foo.safetensors")]
    (tmp_path / "p.txt").write_text("a red circle\n")
    with pytest.raises(UserError, match=message):
        generate.main(generate.parse_args(["--pretrained_model_name_or_path", str(tiny_pipeline), "--prompt_path",
                                           str(tmp_path / "p.txt"), "--image_dir", str(tmp_path / "out"),
                                           "--device", "cpu", "--lora_path", *flags]))
    assert not (tmp_path / "out").exists()
    if case.startswith("LoRA of another base,"):  # on the command line: one line, not diffusers' list of mismatches
        r = subprocess.run([sys.executable, "generate.py", "--pretrained_model_name_or_path", str(tiny_pipeline),
                            "--prompt_path", str(tmp_path / "p.txt"), "--image_dir", str(tmp_path / "out"),
                            "--device", "cpu", "--lora_path", *flags], cwd=ROOT, capture_output=True, text=True,
                           env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}, timeout=300)
        assert r.returncode == 2 and r.stderr.strip().startswith("error: could not load LoRA"), r.stderr


def test_train_export_lora_rank_writes_the_lora_beside_the_outputs(tiny_pipeline, tmp_path):
    out = tmp_path / "run"
    train_esd.main(train_esd.parse_args([
        "--pretrained_model_name_or_path", str(tiny_pipeline), "--output_dir", str(out), "--removing_concepts",
        "red circle", "--num_train_steps", "2", "--num_ddim_steps", "2", "--learning_rate", "1e-3", "--device", "cpu",
        "--export_lora_rank", "2"]))
    with safe_open(str(out / "erasure-lora-r2.safetensors"), "pt") as f:
        meta = f.metadata()
        downs = [f.get_tensor(k) for k in f.keys() if k.endswith("lora_down.weight")]
    assert meta["method"] == "esd" and meta["rank"] == "2" and downs and all(d.shape[0] == 2 for d in downs)
    assert "LoRA" in (out / "train.log").read_text()
    with pytest.raises(SystemExit):  # a bad rank is refused by argparse, before anything runs
        train_esd.parse_args(["--removing_concepts", "x", "--export_lora_rank", "0"])
