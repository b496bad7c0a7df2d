"""Every generate.py command line of the SDD reference code (nannullna/safe-diffusion at a2e820c: README.md and
generate_coco30k.sh) runs here as written, with the model swapped for the tiny pipeline and tiny settings added."""
from __future__ import annotations

import json
import shlex
from pathlib import Path

import pandas as pd
import pytest
import torch

from generate import main, parse_args
from utils.families.tiny import tiny_unet

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--num_inference_steps", "2", "--end", "2"]  # 2 steps, the first 2 prompts

# README.md, "Generate Images"
README_SLD = '''python generate.py \\
    --pretrained_model_name_or_path "CompVis/stable-diffusion-v1-4" \\
    --pipeline_type sld --pipeline_config max \\
    --prompt_path "prompts/country_body.txt" --num_images_per_prompt 10 \\
    --use_fp16 --seed 42 --device "cuda:0"'''
# README.md: "You may provide a fine-tuned U-Net checkpoint with an argument as follows."
README_UNET = "--unet_path <directory-to-unet-containing-config.json>"
# generate_coco30k.sh (its `export MAX_INFER_BATCH_SIZE=4` is --batch_size here, which changes no image)
COCO_SCRIPT = '''python generate.py \\
    --pretrained_model_name_or_path <path-to-fine-tuned-model> \\
    --image_dir "images/sdd_coco30k" \\
    --prompt_path "prompts/coco_30k.csv" \\
    --num_images_per_prompt 1 \\
    --use_fp16 \\
    --device "cuda:0"'''


pytestmark = pytest.mark.usefixtures("one_thread")


def run(command: str, swaps: dict[str, str]) -> dict:
    """Run a reference command line in-process: placeholders and paths swapped, tiny settings appended."""
    argv = shlex.split(command.replace("\\\n", " "))
    assert argv[:2] == ["python", "generate.py"]
    argv = [swaps.get(a, a) for a in argv[2:]]
    if not torch.cuda.is_available():
        argv = ["cpu" if a == "cuda:0" else a for a in argv]
    return main(parse_args(argv + TINY))


def metadata(folder: Path) -> pd.DataFrame:
    """metadata.csv as text cells."""
    return pd.read_csv(folder / "metadata.csv", dtype=str, keep_default_na=False)


@pytest.fixture
def swaps(tiny_pipeline, tmp_path, monkeypatch) -> dict[str, str]:
    """Placeholders and paths of the reference commands -> things that exist here; the commands run in tmp_path."""
    monkeypatch.chdir(tmp_path)
    unet = tmp_path / "sdd-run" / "unet"
    torch.manual_seed(3)
    tiny_unet().save_pretrained(unet)  # a U-Net folder with its config.json, other weights than the base
    coco = tmp_path / "coco_30k.csv"  # the reference CSV's columns
    coco.write_text("image_id,source,prompt,evaluation_seed\n000000203564,coco-30k,a photo of a cat,41337\n"
                    "000000179765,coco-30k,a red circle,63155\n000000322141,coco-30k,a dog,30516\n")
    return {"CompVis/stable-diffusion-v1-4": str(tiny_pipeline), "<path-to-fine-tuned-model>": str(tiny_pipeline),
            "prompts/country_body.txt": str(ROOT / "prompts" / "country_body.txt"), "prompts/coco_30k.csv": str(coco),
            "<directory-to-unet-containing-config.json>": str(unet)}


def test_readme_sld_max_command(swaps):
    summary = run(README_SLD, swaps)
    out = Path("outputs/country_body/pipe_sld-max")  # no --image_dir: the default from the prompt file and mode
    assert summary["written"] == 20 and len(list(out.glob("*.png"))) == 20
    meta = metadata(out)
    assert list(meta["file"][:2]) == ["00000_0.png", "00000_1.png"] and list(meta["prompt"][::10]) == [
        "United States body", "China body"]
    assert list(meta["seed"][::10]) == ["42", "43"] and set(meta["mode"] + "-" + meta["config"]) == {"sld-max"}
    record = json.loads((out / "args.json").read_text())
    assert record["mixed_precision"] == "fp16" and record["dtype"] == "torch.float16"  # --use_fp16


def test_readme_command_with_a_unet(swaps):
    run(README_SLD, swaps)
    summary = run(README_SLD + " " + README_UNET, swaps)
    out = Path("outputs/country_body/sdd-run_sld-max")  # named after the U-Net's run folder
    assert summary["written"] == 20
    assert set(metadata(out)["unet"]) == {swaps["<directory-to-unet-containing-config.json>"]}
    base = Path("outputs/country_body/pipe_sld-max")
    assert (base / "00000_0.png").read_bytes() != (out / "00000_0.png").read_bytes()


def test_coco30k_script(swaps, monkeypatch):
    monkeypatch.setenv("MAX_INFER_BATCH_SIZE", "4")
    summary = run(COCO_SCRIPT, swaps)
    out = Path("images/sdd_coco30k")
    assert summary["written"] == 2
    meta = metadata(out)
    assert list(meta["file"]) == ["00000_0.png", "00001_0.png"] and list(meta["seed"]) == ["41337", "63155"]
    assert list(meta["image_id"]) == ["000000203564", "000000179765"] and set(meta["source"]) == {"coco-30k"}
