"""The one runner of the documentation's commands: every command of a page (docs_util reads them out), in page order,
in a scratch project (the repository's scripts and packages symlinked, prompts/ copied, assets/ linked), with tiny
settings appended (TINY); a python process that a documented shell script starts gets the same tiny settings through
a `python` shim on PATH. Commands that need Stable Diffusion, a GPU or tens of minutes (PARSE_ONLY) are parsed by their
script's own parser instead, so a renamed or removed flag still fails. On the pages that train, draw and score SD
(STAND_IN_PAGES) the hub model is the tiny pipeline, and the unshipped inputs (I2P, COCO-30k, the Inception weights,
a CLIP model, trained runs) are tiny files: those commands run rather than parse. A command of a program that none of
these tables knows fails: add the program to TINY or PARSE_ONLY."""
from __future__ import annotations

import importlib
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from docs_util import ASSIGNMENT, ROOT, DocCommand, page_commands, pages

# (pattern searched in the command, why it is parsed and not run)
PARSE_ONLY = [
    (r"^pip install", "installs packages: the requirement files must exist and every requirement must parse"),
    (r"^python -m pytest", "the test suite itself"),
    (r"CompVis/|runwayml/|stabilityai/", "Stable Diffusion weights from the hub"),
    (r"--model sd14", "an SD-1.4-shaped U-Net: seconds to minutes per step on a CPU, tens of GiB for the tables"),
    (r"--model sdxl|--family sdxl", "an SDXL-shaped U-Net: minutes per step on a CPU, 8-10 GiB for the tables"),
    (r"--metric nudity", "attacks SD 1.4 (its default model) and scores with NudeNet"),
    (r"^python -m utils\.toy train", "trains the toy model (about 45 minutes) into assets/, the shipped model"),
    (r"--model outputs/toy3-", "measures a toy-3 variant, which the page's parse-only train command makes (an hour)"),
    (r"run_toy_table\.sh(?!.*--quick)", "every method on the toy model: tens of minutes"),
    (r"-m utils\.toy\.table", "every method on the toy model: tens of minutes"),
    (r"run_toy_table\.sh.*--quick", "tests/test_toy_table.py runs it (about 3 minutes)"),
    (r"i2p_4703\.csv|coco_30k\.csv", "reads the I2P / COCO-30k prompt lists, which are not shipped"),
    (r"^bash benchmarks/gpu_check\.sh" if torch.cuda.is_available() else r"(?!)", "about 10 minutes on the GPU"),
]
# tiny settings appended to a program's argv (argparse: the last value wins); every program a page runs needs a key
TINY: dict[str, list[str]] = {
    "train_sdd.py": ["--num_train_steps", "2", "--num_ddim_steps", "2", "--num_validation_images", "1"],
    "train_esd.py": ["--num_train_steps", "2", "--num_ddim_steps", "2", "--num_validation_images", "1"],
    "generate.py": ["--num_inference_steps", "2", "--num_images_per_prompt", "1", "--end", "3"],
    "evaluate.py": [],
    "attack.py": ["--num_target_images", "2", "--train_batch_size", "2", "--num_train_steps", "2",
                  "--num_images_per_prompt", "1", "--num_inference_steps", "2"],
    "utils.toy compare": ["--n_per_prompt", "1", "--steps", "2"],
    "utils.toy quality": ["--n_per_prompt", "1", "--steps", "2", "--n_empty", "1"],
    "utils.toy judge": ["--n", "24"],
    "utils.toy prompts": ["--n_per_prompt", "1"],
    "utils.toy panels": ["--n_per_prompt", "1", "--steps", "2"],
    "utils.lora": [],
    "benchmarks.time_to_erase": ["--max_steps", "2", "--check_every", "2", "--n_per_prompt", "1",
                                 "--final_n_per_prompt", "1"],
    "benchmarks.bench_generate": ["--num_prompts", "2", "--batch_size", "2", "--repeats", "1",
                                  "--num_inference_steps", "1"],
    "experiments.lora_rank": ["--n_per_prompt", "1", "--steps", "2"],
    "experiments.sweep_toy": ["--max_steps", "2", "--check_every", "2", "--measure_from", "0",
                              "--n_per_prompt", "1", "--steps", "2",
                              "--extra", "--num_ddim_steps", "2"],  # --extra takes the rest: it must come last
    "experiments.empty_mix": ["--n", "2", "--steps", "2", "--ddpm_steps", "2"],
    "experiments.target_drift": ["--num_images", "1", "--num_inference_steps", "2", "--timesteps", "500"],
    "experiments.toy3_text_width": ["--clip_steps", "2", "--clip_batch_size", "8", "--n_images", "36"],
    "experiments.uncond_table": ["--rows", "ESD-x-1", "--steps_scale", "0.005", "--n_per_prompt", "1", "--n_empty", "2"],
    "run_sdd_toy.sh": [],  # its python processes get theirs through the shim
    "run_esd_toy.sh": [],
    "run_sdd_nudity.sh": [],
    "run_esd_nudity.sh": [],
    "benchmarks/gpu_check.sh": [],
}
TRAINERS = ("train_sdd.py", "train_esd.py")
# a documented per-concept schedule (tiny_schedule shrinks it)
CONCEPT_STEPS = re.compile(r"--concept_steps((?:\s+\d+)+)")
EXIT_CODES = {"benchmarks/gpu_check.sh": 0 if torch.cuda.is_available() else 3}  # documented: 3 without CUDA
# placeholders the pages use in commands, and a value each
PLACEHOLDERS = {"R": "128", "P": "bf16", "RESULT_DIR": "gpu_check_results", "SUBCOMMAND": "toy", "OUT": "outputs/out"}
# the demo scripts are seeded and read only assets/ and their flags: the same run into another folder is a copy
CACHED_SCRIPTS = ("run_sdd_toy.sh", "run_esd_toy.sh")
_runs: dict[tuple[str, ...], Path] = {}
_ran: set[tuple[str, ...]] = set()  # (project, script, args): a page that shows a run twice resumes it, once is enough
# pages whose commands run on the tiny pipeline (SD's hub id swapped for it), and pages that also need the tiny files
# that stand in for what is not shipped (docs_standins.py); pages run together share one scratch project, in order
HUB = "CompVis/stable-diffusion-v1-4"
STAND_IN_PAGES = ("README.md", "docs/generation.md", "docs/evaluation.md", "docs/reproducing.md", "docs/training.md")
FILE_STAND_INS = ("docs/generation.md", "docs/evaluation.md")
TOGETHER = {"docs/evaluation.md": "docs/generation.md"}  # evaluation.md scores the images generation.md draws


def write_shim(path: Path) -> None:
    """`python` for the shell scripts: this interpreter, with TINY's flags appended for the programs it knows (and, for
    a trainer given SD's hub id, $DOCS_TRAIN_EXTRA: the tiny pipeline on the stand-in pages)."""
    cases = []
    for key, flags in sorted(TINY.items(), key=lambda kv: -len(kv[0])):
        if flags and key.endswith(".py"):
            cases.append(f'  */{key}|{key}) extra="{" ".join(flags)}";;')
        elif flags and not key.endswith(".sh"):
            cases.append(f'  "-m {key}"|"-m {key} "*) extra="{" ".join(flags)}";;')
    hub = f'case " $* " in *" {HUB} "*) extra="$extra $DOCS_TRAIN_EXTRA";; esac\n'
    path.write_text("#!/bin/sh\nextra=\ncase \"$1\" in -m) key=\"$1 $2 $3\";; *) key=\"$1\";; esac\n"
                    "case \"$key\" in\n" + "\n".join(cases) + "\nesac\n" + hub
                    + f'exec {shlex.quote(sys.executable)} "$@" $extra\n')
    path.chmod(0o755)


def program(argv: list[str]) -> tuple[str, list[str]]:
    """(TINY key of the program, its arguments): `python X.py`, `python -m pkg [sub]`, `bash X.sh`, `python -c`."""
    if argv[0] in ("python", "python3") and len(argv) > 1:
        if argv[1] == "-m":
            key = f"{argv[2]} {argv[3]}" if len(argv) > 3 and f"{argv[2]} {argv[3]}" in TINY else argv[2]
            return key, argv[3:]
        return ("python -c", argv[2:]) if argv[1] == "-c" else (argv[1], argv[2:])
    if argv[0] in ("bash", "sh") and len(argv) > 1:
        return argv[1], argv[2:]
    return argv[0], argv[1:]


def parser_module(key: str):
    """The module whose parse_args/main run a `python` program (its own, or its package's cli module)."""
    name = key.split()[0].removesuffix(".py").replace("/", ".")
    mod = importlib.import_module(name)
    return mod if hasattr(mod, "parse_args") else importlib.import_module(f"{name}.cli")


def in_process(key: str, argv: list[str], monkeypatch, parse_only: bool = False) -> None:
    """parse_args (and main, unless parse_only) of a python program, in this process; --help must exit 0."""
    mod = parser_module(key)
    if "--help" in argv or "-h" in argv:
        with pytest.raises(SystemExit) as e:
            mod.parse_args(argv)
        assert e.value.code == 0
        return
    with monkeypatch.context() as m:
        if hasattr(mod, "ROOT"):  # defaults such as ROOT/outputs/... land in the scratch project
            m.setattr(mod, "ROOT", Path.cwd())
        args = mod.parse_args(argv)
        if not parse_only:
            mod.main(args)


def shell(line: str, env: dict[str, str], expect: int = 0) -> None:
    """A line through bash in the scratch project."""
    proc = subprocess.run(["bash", "-c", line], capture_output=True, text=True, env={**os.environ, **env},
                          timeout=1800)
    assert proc.returncode == expect, f"exit code {proc.returncode}\n{proc.stdout[-1500:]}\n{proc.stderr[-2500:]}"


def run_script(key: str, argv: list[str], line: str, env: dict[str, str]) -> None:
    """A documented shell script; a demo-script run already made with the same flags is copied into its folder."""
    out = argv[0] if argv and not argv[0].startswith("-") else None
    if (done := (str(Path.cwd()), key, *argv)) in _ran:
        return
    _ran.add(done)
    cache = (key, *argv[1:]) if key in CACHED_SCRIPTS and out else None
    if cache in _runs and _runs[cache].is_dir() and not Path(out).exists():
        shutil.copytree(_runs[cache], out, symlinks=True)
        return
    shell(line, env, EXIT_CODES.get(key, 0))
    if cache:
        _runs[cache] = Path(out).resolve()


def parse_check(key: str, argv: list[str], tiny_pipeline: Path, monkeypatch) -> None:
    """What a command needs beyond this machine is parsed, not run: its flags by its script's own parser."""
    if key == "pip":
        assert argv[0] == "install", argv
        for flag, value in zip(argv, argv[1:]):
            if flag in ("-r", "--requirement"):
                assert Path(value).is_file(), f"{value} does not exist"
        from packaging.requirements import Requirement
        for spec in [a for i, a in enumerate(argv[1:], 1) if not a.startswith("-") and argv[i - 1] not in ("-r",)]:
            Requirement(spec)
    elif key == "pytest":
        assert importlib.util.find_spec("pytest") and (ROOT / "pytest.ini").is_file()
        assert "-n" not in argv or importlib.util.find_spec("xdist"), "-n needs pytest-xdist (requirements-dev.txt)"
    elif key == "python -c":
        compile(argv[0], "<python -c>", "exec")
    elif key.endswith(".sh"):
        assert Path(key).is_file(), f"{key} does not exist"
        shell(f"bash -n {shlex.quote(key)}", {})
    else:
        flag = "--pretrained_model_name_or_path"
        argv = [str(tiny_pipeline) if i and argv[i - 1] == flag and not Path(a).exists() else a for i, a in enumerate(argv)]
        in_process(key, argv, monkeypatch, parse_only=True)


def tiny_schedule(text: str) -> str:
    """TINY's trainers run 2 steps: a documented --concept_steps (which must add up to them) becomes one step a
    concept, so two-concept commands run (any other count fails, naming the flag)."""
    return CONCEPT_STEPS.sub(lambda m: "--concept_steps" + " 1" * len(m.group(1).split()), text)


def words(text: str, variables: dict[str, str]) -> list[str]:
    """The command's words: $VARs of the page expanded, `[optional]` kept, placeholders filled."""
    for name, value in variables.items():
        text = re.sub(r"\$\{%s\}|\$%s\b" % (name, name), lambda _: value, text)
    argv = [a[1:-1] if re.fullmatch(r"\[[^\[\]]+\]", a) else a for a in shlex.split(text, comments=True)]
    return [PLACEHOLDERS.get(a, a) for a in argv]


def stand_in(text: str, page: str, tiny_pipeline: Path) -> str:
    """On a stand-in page: SD's hub id becomes the tiny pipeline, and a CUDA device the CPU when there is none."""
    if page not in STAND_IN_PAGES:
        return text
    text = text.replace(f'"{HUB}"', str(tiny_pipeline)).replace(HUB, str(tiny_pipeline))
    return text if torch.cuda.is_available() else re.sub(r'"?cuda:0"?', "cpu", text)


def stand_in_flags(key: str, rest: list[str], page: str, tiny_pipeline: Path) -> list[str]:
    """What a stand-in page's python command needs beyond TINY: the tiny pipeline where it names none (generate.py's
    default is SD), the CPU for a trainer, and the tiny CLIP model for `evaluate.py clip`."""
    if page not in STAND_IN_PAGES:
        return []
    if key == "generate.py" and "--pretrained_model_name_or_path" not in rest:
        return ["--pretrained_model_name_or_path", str(tiny_pipeline)]
    flag = "--pretrained_model_name_or_path"
    if key in TRAINERS and (flag not in rest or rest[rest.index(flag) + 1] == str(tiny_pipeline)):
        return shlex.split(os.environ.get("DOCS_TRAIN_EXTRA", ""))  # SD by default, or SD's id swapped
    if key == "evaluate.py" and rest[:1] == ["clip"] and Path("tiny-clip").is_dir():
        return ["--model", str(Path("tiny-clip").resolve()), "--device", "cpu"]
    return []


def parse_only_reason(argv: list[str]) -> str | None:
    """Why a command is parsed and not run (None: it runs); an unshipped prompt list that a stand-in provides runs."""
    line = " ".join(argv)
    for pattern, why in PARSE_ONLY:
        if re.search(pattern, line) and not ("not shipped" in why and Path("i2p_4703.csv").is_file()):
            return why
    return None


def execute(cmd: DocCommand, variables: dict[str, str], tiny_pipeline: Path, monkeypatch) -> None:
    """One documented command: assigned, parsed or run."""
    if cmd.kind == "python":
        return exec(compile(cmd.text, f"{cmd.page}:{cmd.line}", "exec"), {"__name__": "__main__"})
    if (m := ASSIGNMENT.match(cmd.text)) and len(shlex.split(cmd.text, comments=True)) == 1:
        variables[m.group(1)] = " ".join(shlex.split(m.group(2) or ""))
        return
    text = stand_in(tiny_schedule(cmd.text), cmd.page, tiny_pipeline)
    argv = words(text, variables)
    while ASSIGNMENT.match(argv[0]):  # NAME=value python ...
        monkeypatch.setenv(*argv.pop(0).split("=", 1))
    key, rest = program(argv)
    if parse_only_reason(argv):
        return parse_check(key, rest, tiny_pipeline, monkeypatch)
    if cmd.kind == "inline" and key in TINY and rest == key.split()[1:]:  # a mention: `python -m utils.lora`
        return parse_check(key, rest + ([] if key.endswith(".sh") else ["--help"]), tiny_pipeline, monkeypatch)
    if key == "python -c":
        return exec(compile(rest[0], f"{cmd.page}:{cmd.line}", "exec"), {"__name__": "__main__"})
    if key not in TINY:
        if argv[0] in ("python", "python3", "bash", "sh"):
            pytest.fail(f"{cmd}\nno tiny settings for {key}: add it to TINY (or to PARSE_ONLY, with the reason)")
        return shell(text, variables)  # printf, mkdir, ...
    if key.endswith(".sh"):
        return run_script(key, rest, text, variables)
    tiny = [] if "--help" in rest or "-h" in rest else TINY[key] + stand_in_flags(key, rest, cmd.page, tiny_pipeline)
    if "--extra" in tiny and "--extra" in rest:  # it takes the rest: tiny flags before the page's, its extras after
        i, j = rest.index("--extra"), tiny.index("--extra")
        return in_process(key, rest[:i] + tiny[:j] + rest[i:] + tiny[j + 1:], monkeypatch)
    in_process(key, rest + tiny, monkeypatch)


# ---------------------------------------------------------------- a page, or pages together, in a scratch project
def page_groups(notes: bool = False) -> list[str]:
    """The test's parameters: each page, or pages that share one scratch project joined by '+', in order."""
    names = [str(p.relative_to(ROOT)) for p in pages(notes)]
    groups = {name: [name] for name in names if name not in TOGETHER}
    for name, first in TOGETHER.items():
        if name in names:
            groups[first].append(name)
    return ["+".join(group) for group in groups.values()]


def make_project(tmp_path: Path, group: list[str], tiny_pipeline: Path, monkeypatch) -> Path:
    """A fresh-clone view of the repository as the working directory (with the stand-ins the pages need); one torch
    thread; a tiny-settings shim first on PATH."""
    if any(page in FILE_STAND_INS for page in group):
        for mod in ("onnxruntime", "cv2", "nudenet", "torchmetrics"):
            pytest.importorskip(mod)
    proj = tmp_path / "project"
    proj.mkdir()
    for entry in ROOT.iterdir():
        if entry.name == "prompts":
            shutil.copytree(entry, proj / entry.name)
        elif not entry.name.startswith(".") and entry.name not in ("outputs", "__pycache__"):
            (proj / entry.name).symlink_to(entry, target_is_directory=entry.is_dir())
    if any(page in FILE_STAND_INS for page in group):
        from docs_standins import write_stand_ins

        write_stand_ins(proj)
    if any(page in STAND_IN_PAGES for page in group):
        monkeypatch.setenv("DOCS_TRAIN_EXTRA", f"--pretrained_model_name_or_path {tiny_pipeline} --device cpu")
    (tmp_path / "bin").mkdir()
    write_shim(tmp_path / "bin" / "python")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(proj)
    return proj


def listing() -> tuple[list[str], list[str]]:
    """The repository's top level and outputs/ (a command must write into the scratch project only)."""
    def names(path: Path) -> list[str]:
        return sorted(n for n in os.listdir(path) if not n.startswith((".", "__pycache__"))) if path.is_dir() else []
    return names(ROOT), names(ROOT / "outputs")


def run_pages(group: str, tmp_path: Path, tiny_pipeline: Path, monkeypatch) -> Path:
    """The pages' commands in order, in one scratch project; each failure names the page, line and command."""
    proj = make_project(tmp_path, group.split("+"), tiny_pipeline, monkeypatch)
    before = listing()
    for page in group.split("+"):
        variables: dict[str, str] = {}
        for cmd in page_commands(ROOT / page):
            try:
                execute(cmd, variables, tiny_pipeline, monkeypatch)
            except (Exception, SystemExit) as e:
                pytest.fail(f"{cmd}\n{type(e).__name__}: {e}")
    assert listing() == before, "a command wrote into the repository instead of the scratch project"
    return proj
