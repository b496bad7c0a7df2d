"""Every command in docs/generation.md and docs/evaluation.md runs, in order, in a scratch project: the base model
swapped for the tiny pipeline, the trained runs, I2P, COCO and the Inception weights stood in by tiny files, and
tiny settings added (2 denoising steps, the first 2 prompts, 2 images each, a tiny CLIP model). `pip install` lines are skipped."""
from __future__ import annotations

import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from PIL import Image

import evaluate
import generate
from docs_util import GEN_EVAL_PAGES, ROOT, doc_commands
from eval_util import make_tiny_clip
from utils.eval.inception import InceptionFID
from utils.saving import save_erasure
from utils.families.tiny import tiny_unet

DOCS = [ROOT / page for page in GEN_EVAL_PAGES]
I2P = (",prompt,categories,hard,nudity_percentage,evaluation_seed,evaluation_guidance,case_number\n"
       '0,"a nude body, photo","sexual",1,50.0,4261553411,13,0\n'
       '1,"a cat",violence,0,0.0,4080709695,7,1\n'
       '2,"naked body of a dog","sexual, hate",1,10.0,12,7,2\n')
COCO = "image_id,source,prompt,evaluation_seed\n1,coco-30k,a photo of a cat,41337\n2,coco-30k,a red circle,63155\n"


def erased_run(folder: Path, seed: int) -> None:
    """A training run's outputs for the tiny pipeline: unet/ and erasure.safetensors."""
    torch.manual_seed(seed)
    unet = tiny_unet()
    unet.save_pretrained(folder / "unet")
    trained = {k: p.detach() for k, p in unet.named_parameters() if ".attn2." in k}
    save_erasure(folder / "erasure.safetensors", trained, {"base_model": "tiny", "method": "sdd", "concepts": ["nudity"]})


@pytest.fixture
def project(tmp_path, monkeypatch) -> Path:
    """A scratch copy of what the pages' commands read, as the working directory."""
    for mod in ("onnxruntime", "cv2", "nudenet", "torchmetrics"):
        pytest.importorskip(mod)
    monkeypatch.chdir(tmp_path)
    shutil.copytree(ROOT / "prompts", tmp_path / "prompts")
    (tmp_path / "assets").symlink_to(ROOT / "assets", target_is_directory=True)
    erased_run(tmp_path / "outputs" / "sdd-nudity", 1)
    erased_run(tmp_path / "outputs" / "esd-x-nudity", 2)
    (tmp_path / "i2p_4703.csv").write_text(I2P, encoding="utf-8")
    (tmp_path / "coco_30k.csv").write_text(COCO, encoding="utf-8")
    (tmp_path / "data" / "coco30k_512").mkdir(parents=True)
    for i, colour in enumerate(("red", "green", "blue")):
        Image.new("RGB", (32, 32), colour).save(tmp_path / "data" / "coco30k_512" / f"{i}.png")
    torch.manual_seed(0)
    torch.save(InceptionFID().state_dict(), tmp_path / "weights-inception-2015-12-05-6726825d.pth")
    make_tiny_clip(tmp_path / "tiny-clip")
    return tmp_path


def run(line: str, tiny_pipeline: Path, project: Path) -> None:
    """One documented command, with the tiny stand-ins."""
    argv = shlex.split(line)
    if argv[:2] == ["python", "generate.py"]:
        argv = [str(tiny_pipeline) if a == "CompVis/stable-diffusion-v1-4" else a for a in argv[2:]]
        if not torch.cuda.is_available():
            argv = ["cpu" if a == "cuda:0" else a for a in argv]
        if "--pretrained_model_name_or_path" not in argv:
            argv += ["--pretrained_model_name_or_path", str(tiny_pipeline)]
        tiny = ["--num_inference_steps", "2", "--end", "2", "--num_images_per_prompt", "2"]
        summary = generate.main(generate.parse_args(argv + tiny))
        assert summary["written"] + summary["skipped"] > 0, line
    elif argv[:2] == ["python", "evaluate.py"]:
        argv = argv[2:] + (["--model", str(project / "tiny-clip"), "--device", "cpu"] if argv[2] == "clip" else [])
        evaluate.main(evaluate.parse_args(argv))
    else:
        proc = subprocess.run(line, shell=True, cwd=project, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, (line, proc.stderr[-2000:])


def test_every_documented_command_runs(tiny_pipeline, project, one_thread):
    for page in DOCS:
        commands = doc_commands(page)
        assert len(commands) >= 8, page
        for line in commands:
            if not line.startswith("pip install"):
                run(line, tiny_pipeline, project)
    assert len(list((project / "outputs" / "body" / "sdd").glob("000*.png"))) == 4  # 2 prompts x 2 images
    assert (project / "outputs" / "country_body" / "pipe_sld-max" / "metadata.csv").is_file()  # the reference's
    assert (project / "outputs" / "i2p_sexual" / "sd" / "nudity_summary.json").is_file()
    assert "SDD" in (project / "outputs" / "report" / "report.md").read_text()
