"""Every training command line of the reference repository (nannullna/safe-diffusion) runs with our scripts.

Its README trains with `bash run_sdd_nudity.sh` and `bash run_esd_nudity.sh`; the python lines of those two scripts
are below as they stand there (commit a2e820c). Each runs here with the model path swapped for the tiny pipeline
and flags appended that cut it to one step on the CPU (later flags win, as in argparse).
"""
from __future__ import annotations

import shlex
from pathlib import Path

import pytest
import torch
from PIL import Image

import train_esd
import train_sdd
from utils.cli import UserError

# the reference's run_sdd_nudity.sh and run_esd_nudity.sh: the same command line, one for each trainer
REFERENCE_TRAIN_COMMAND = """python {script} \\
    --pretrained_model_name_or_path "CompVis/stable-diffusion-v1-4" \\
    --removing_concepts \\
        "nudity" \\
    --validation_prompts \\
        "japan body" \\
    --num_images_per_prompt 10 \\
    --seed 42 \\
    --devices 0 0"""
REFERENCE_TRAIN_COMMANDS = {f"run_{m}_nudity.sh": REFERENCE_TRAIN_COMMAND.format(script=f"train_{m}.py")
                            for m in ("sdd", "esd")}
SCRIPTS = {"train_sdd.py": train_sdd, "train_esd.py": train_esd}


def reference_argv(name: str, model: Path) -> tuple[object, list[str]]:
    """(our script's module, its argv) for a reference command line, the model path swapped for `model`."""
    argv = shlex.split(REFERENCE_TRAIN_COMMANDS[name].replace("\\\n", " "))
    assert argv[0] == "python"
    i = argv.index("--pretrained_model_name_or_path")
    argv[i + 1] = str(model)
    return SCRIPTS[argv[1]], argv[2:]


@pytest.mark.parametrize("name", sorted(REFERENCE_TRAIN_COMMANDS))
def test_reference_command_line_runs(tiny_pipeline, tmp_path, name):
    mod, argv = reference_argv(name, tiny_pipeline)
    out = tmp_path / "out"
    args = mod.parse_args([*argv, "--num_train_steps", "1", "--num_ddim_steps", "2", "--device", "cpu",
                           "--output_dir", str(out)])
    assert args.num_validation_images == 10 and args.seed == 42 and args.validation_prompts == ["japan body"]
    mod.main(args)
    assert (out / "unet" / "config.json").exists() and (out / "erasure.safetensors").exists()
    grid = Image.open(out / "validation" / "step-1.png")  # one labelled row of 10 images of "japan body"
    side = grid.height - 4  # utils.images.image_grid: 2 px padding, 160 px label
    assert (grid.width - 160 - 2) / (side + 2) == 10


@pytest.mark.parametrize("name", sorted(REFERENCE_TRAIN_COMMANDS))
def test_reference_devices_flag_means_the_first_gpu(tiny_pipeline, name):
    mod, argv = reference_argv(name, tiny_pipeline)
    args = mod.parse_args(argv)
    assert args.device == "cuda:0"
    assert mod.parse_args([*argv, "--devices", "1", "0"]).device == "cuda:1"
    assert mod.parse_args([*argv, "--device", "cpu"]).device == "cpu"  # the later flag wins


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_reference_command_without_a_gpu_is_one_line_and_writes_nothing(tiny_pipeline, tmp_path):
    mod, argv = reference_argv("run_sdd_nudity.sh", tiny_pipeline)
    with pytest.raises(UserError, match="CUDA is not available") as e:
        mod.main(mod.parse_args([*argv, "--output_dir", str(tmp_path / "out")]))
    assert "\n" not in str(e.value) and not (tmp_path / "out").exists()


def test_reference_flag_names_are_aliases_of_ours():
    base = ["--removing_concepts", "nudity"]
    for mod in (train_sdd, train_esd):
        assert mod.parse_args([*base, "--use_fp16"]).mixed_precision == "fp16"
        assert mod.parse_args(base).mixed_precision == "no"
        assert mod.parse_args([*base, "--num_images_per_prompt", "4"]).num_validation_images == 4
        assert mod.parse_args([*base, "--eval_every", "100"]).validation_steps == 100
    assert train_esd.parse_args([*base, "--concept_scale", "2.5"]).negative_guidance == [2.5]
