"""The run scripts and the training docs: the bash examples carry the papers' settings and parse, and every training
command the docs show runs (on the tiny pipeline, one step)."""
from __future__ import annotations

import shlex
from pathlib import Path

import pytest

import train_esd
import train_sdd
from docs_util import doc_training_commands

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("script", ["run_sdd_nudity.sh", "run_esd_nudity.sh", "run_sdd_toy.sh", "run_esd_toy.sh"])
def test_bash_example_flags_parse(script):
    text = (ROOT / script).read_text().replace("\\\n", " ")
    line = next(ln for ln in text.splitlines() if ln.strip().startswith("python ") and "train_" in ln)
    line = line.replace('"$HERE"/', "").replace('"$HERE/', '"').replace("$HERE/", "")
    argv = shlex.split(line.replace('"$OUTPUT_DIR"', "OUT").replace('"$@"', ""))
    mod = {"train_sdd.py": train_sdd, "train_esd.py": train_esd}[argv[1]]
    args = mod.parse_args(argv[2:])
    if "nudity" in script:
        assert args.pretrained_model_name_or_path == "CompVis/stable-diffusion-v1-4"
        assert (ROOT / args.removing_concepts[0]).exists() and (ROOT / args.validation_prompts[0]).exists()
        assert args.num_train_steps == (1500 if script == "run_sdd_nudity.sh" else 1000)
    else:
        assert args.pretrained_model_name_or_path == "assets/toy-sd" and "red" in args.removing_concepts[0]
    # the diffusers training examples' names for two flags work too
    args = mod.parse_args([*argv[2:], "--max_train_steps", "7", "--adam_weight_decay", "0.5"])
    assert args.num_train_steps == 7 and args.weight_decay == 0.5


def script_argv(script: str, out: str = "OUT", *extra: str):
    """(module, argv) of a run_*.sh script's python line, with its output folder and the flags appended to it."""
    text = (ROOT / script).read_text().replace("\\\n", " ")
    line = next(ln for ln in text.splitlines() if ln.strip().startswith("python ") and "train_" in ln)
    line = line.replace('"$HERE"/', "").replace('"$HERE/', '"').replace("$HERE/", "")
    argv = shlex.split(line.replace('"$OUTPUT_DIR"', out).replace('"$@"', ""))
    return {"train_sdd.py": train_sdd, "train_esd.py": train_esd}[argv[1]], [*argv[2:], *extra]


def script_args(script: str, *extra: str):
    """Parse a run_*.sh script's python command line (with extra flags appended, as the script passes "$@")."""
    mod, argv = script_argv(script, "OUT", *extra)
    return mod.parse_args(argv)


def test_esd_script_is_the_papers_esd_x_3_and_appending_noxattn_gives_esd_u_3():
    x = script_args("run_esd_nudity.sh")
    u = script_args("run_esd_nudity.sh", "--finetuning_method", "noxattn")
    for args in (x, u):  # the reference code's ESD: eta 3, AdamW with weight decay 1e-4, clipping at 1.0
        assert (args.negative_guidance, args.weight_decay, args.max_grad_norm) == ([3.0], 1e-4, 1.0)
        assert (args.learning_rate, args.num_train_steps, args.guidance_scale) == (1e-5, 1000, 3.0)
    assert x.finetuning_method == "xattn" and u.finetuning_method == "noxattn"
    defaults = train_esd.parse_args(["--removing_concepts", "x"])  # the script's values are also train_esd's defaults
    assert (defaults.negative_guidance, defaults.weight_decay, defaults.max_grad_norm) == ([3.0], 1e-4, 1.0)


@pytest.mark.parametrize("script", ["run_sdd_nudity.sh", "run_esd_nudity.sh"])
def test_paper_scripts_train_in_fp32_and_take_the_small_gpu_form(script):
    args = script_args(script)
    assert args.mixed_precision == "no" and not args.gradient_checkpointing and not args.allow_tf32
    small = script_args(script, "--mixed_precision", "bf16", "--gradient_checkpointing")
    assert small.mixed_precision == "bf16" and small.gradient_checkpointing
    assert "--mixed_precision bf16 --gradient_checkpointing" in (ROOT / script).read_text()  # documented there


def test_the_docs_show_the_paper_rows_and_the_small_gpu_form():
    commands = [c for _, c in doc_training_commands()]
    assert "bash run_sdd_nudity.sh outputs/sdd-nudity" in commands
    assert "bash run_esd_nudity.sh outputs/esd-u-nudity --finetuning_method noxattn" in commands
    assert any("--mixed_precision bf16 --gradient_checkpointing" in c for c in commands)


@pytest.mark.parametrize("page,command", doc_training_commands())
def test_training_docs_command_runs(tiny_pipeline, tmp_path, page, command, capsys):
    """Each command as written, with the tiny pipeline, one step on the CPU and a temp output folder appended."""
    argv = shlex.split(command)
    if argv[0] == "bash":
        mod, argv = script_argv(argv[1], *(argv[2:] or ["OUT"]))
    else:
        mod, argv = {"train_sdd.py": train_sdd, "train_esd.py": train_esd}[argv[1]], argv[2:]
    if "--help" in argv:
        with pytest.raises(SystemExit) as e:
            mod.parse_args(argv)
        assert e.value.code == 0 and "--removing_concepts" in capsys.readouterr().out
        return
    out = tmp_path / "out"
    mod.main(mod.parse_args([*argv, "--pretrained_model_name_or_path", str(tiny_pipeline), "--num_train_steps", "1",
                             "--num_ddim_steps", "2", "--device", "cpu", "--output_dir", str(out)]))
    assert (out / "unet").exists() and (out / "erasure.safetensors").exists()
