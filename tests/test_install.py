"""The README's install is the install its commands get: the user commands run where only the packages that
requirements.txt brings can be imported (tests/core_only/sitecustomize.py hides the rest: scipy, nudenet, onnxruntime,
cv2, torchmetrics, pytest, ...), and their output carries no third-party FutureWarning or torchvision notice."""
from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from install_util import core_only_env

ROOT = Path(__file__).resolve().parents[1]
# what requirements-eval.txt and requirements-dev.txt bring: these must be among the hidden modules
EXTRAS = ("scipy", "nudenet", "onnxruntime", "cv2", "torchmetrics", "pytest", "_pytest", "xdist")


@pytest.fixture(scope="module")
def core_env() -> dict[str, str]:
    env = {**core_only_env(), "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    hidden = env["SDD_TEST_BLOCKED_MODULES"].split(",")
    assert set(EXTRAS) <= set(hidden), sorted(set(EXTRAS) - set(hidden))
    assert not {"torch", "diffusers", "transformers", "PIL", "numpy", "pandas"} & set(hidden)
    return env


def script_flags(script: str, command: str, out: Path) -> list[str]:
    """The flags that `script` passes to `command` (its line-continued block, up to "$@"), with $MODEL, $HERE and the
    output folder filled in: the demo's own settings, to which a test appends smaller step counts."""
    text = (ROOT / script).read_text().replace("\\\n", " ")
    model = re.search(r'^MODEL="([^"]*)"', text, re.M)  # the model the script uses unless a flag names another
    line = next(l for l in text.splitlines() if l.strip().startswith("python") and command in l)
    line = line.replace("$MODEL", model.group(1) if model else "$MODEL")
    words = shlex.split(line.replace("$HERE", str(ROOT)).replace("$OUTPUT_DIR", str(out)))
    words = words[next(i for i, w in enumerate(words) if w.endswith(command.split()[-1])) + 1:]
    return [w for w in words if w != "$@"]


# One interpreter runs the commands one after another (as `python SCRIPT` / `python -m MODULE`, through runpy): the
# imports are paid once, which keeps this a quick test.
DRIVER = r"""
import importlib.util, json, runpy, sys
hidden, commands = json.loads(sys.argv[1])
found = [m for m in hidden if importlib.util.find_spec(m) is not None]
assert not found, f"the blocker did not hide {found}"
try:
    import scipy
except ImportError:
    pass
else:
    raise AssertionError("import scipy worked")
for kind, target, *argv in commands:
    print("$", kind, target, *argv, flush=True)
    sys.argv = [target, *argv]
    if kind == "script":
        runpy.run_path(target, run_name="__main__")
    else:
        sys.modules.pop(target, None)  # imported already by an earlier command: run it afresh, as `python -m` does
        runpy.run_module(target, run_name="__main__", alter_sys=True)
"""


@pytest.fixture(scope="module")
def core_run(core_env, tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    """The README's commands, cheapest faithful versions: the ESD and SDD toy demos (their scripts' flags, 2 steps,
    then `utils.toy compare` on 1 image per prompt), generate.py (sd and SLD), evaluate.py toy, attack.py --metric
    toy and the LoRA export."""
    out = tmp_path_factory.mktemp("core")
    (out / "prompts.txt").write_text("a red circle\nan apple\n")
    small = ["--num_train_steps", "2", "--train_batch_size", "1", "--num_ddim_steps", "2", "--checkpointing_steps",
             "1", "--validation_steps", "2", "--num_validation_images", "1"]
    commands = [
        ["script", "train_esd.py", *script_flags("run_esd_toy.sh", "train_esd.py", out / "esd"), *small],
        ["module", "utils.toy", "compare", *script_flags("run_esd_toy.sh", "utils.toy compare", out / "esd"),
         "--n_per_prompt", "1", "--steps", "2"],
        ["script", "train_sdd.py", *script_flags("run_sdd_toy.sh", "train_sdd.py", out / "sdd"), *small],
        ["script", "generate.py", "--pretrained_model_name_or_path", "assets/toy-sd", "--prompt_path",
         str(out / "prompts.txt"), "--num_images_per_prompt", "1", "--num_inference_steps", "2", "--image_dir",
         str(out / "sd"), "--device", "cpu"],
        ["script", "generate.py", "--pretrained_model_name_or_path", "assets/toy-sd", "--prompt_path",
         str(out / "prompts.txt"), "--num_images_per_prompt", "1", "--num_inference_steps", "2", "--image_dir",
         str(out / "sld"), "--pipeline_type", "sld", "--pipeline_config", "max", "--device", "cpu"],
        ["script", "evaluate.py", "toy", str(out / "sd")],
        ["script", "attack.py", "--pretrained_model_name_or_path", "assets/toy-sd", "--unet_path",
         str(out / "esd" / "unet"), "--concept", "red", "--metric", "toy", "--target_prompt", "a {} circle",
         "--prompts", "a {} circle", "--num_target_images", "2", "--num_train_steps", "2", "--train_batch_size", "2",
         "--num_images_per_prompt", "1", "--num_inference_steps", "2", "--device", "cpu", "--output_dir",
         str(out / "attack")],
        ["module", "utils.lora", str(out / "esd" / "erasure.safetensors"), "--rank", "1"],
    ]
    res = subprocess.run([sys.executable, "-c", DRIVER, json.dumps([EXTRAS, commands])], cwd=ROOT, env=core_env,
                         capture_output=True, text=True, timeout=300)
    return res, out


def test_readme_commands_run_with_requirements_txt_alone(core_run):
    res, out = core_run
    assert res.returncode == 0, f"{res.stdout[-2000:]}\n{res.stderr[-3000:]}"
    for path in ("esd/unet", "esd/before_after.png", "sdd/unet", "sd/toy_summary.json", "sld/metadata.csv",
                 "attack/attack_summary.json", "esd/erasure-lora-r1.safetensors"):
        assert (out / path).exists(), path
    assert "post-attack" in res.stdout


def test_their_output_has_no_third_party_warnings(core_run):
    res, _ = core_run
    assert not re.search(r"\w*Warning\b|torchvision", res.stderr), res.stderr[-3000:]
