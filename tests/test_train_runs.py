"""Training runs as a user meets them: resuming is bit for bit, a resume must be the same run, stop signals save a
checkpoint and say how to continue, finished runs are not overwritten, bad input is one line and writes nothing."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import train_esd
import train_sdd
from cli_util import run_entry
from train_util import FAST, esd_args, final_weights, sd_args
from utils.cli import UserError, same_flag_value

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("script,reuse", [("sdd", "1"), ("esd", "1"), ("sdd", "3")])
def test_resume_equals_uninterrupted(tiny_pipeline, tmp_path, script, reuse):
    mod, make = (train_sdd, sd_args) if script == "sdd" else (train_esd, esd_args)
    # with --trajectory_reuse 3 the step-2 checkpoint falls inside a trajectory (2 of its 3 micro-steps left)
    extra = ["--num_train_steps", "4", "--checkpointing_steps", "2", "--learning_rate", "1e-3", "--seed", "3",
             "--timestep_jitter", "--gradient_accumulation_steps", "2", "--lr_scheduler", "cosine", "--lr_warmup_steps", "1",
             "--trajectory_reuse", reuse]
    if script == "sdd":
        extra += ["--ema_decay", "0.5"]
    full = mod.main(make(tiny_pipeline, tmp_path / "full", *extra))
    # a run that only got to its step-2 checkpoint, resumed
    part = tmp_path / "part"
    part.mkdir()
    shutil.copytree(full / "checkpoint-2", part / "checkpoint-2")
    resumed = mod.main(make(tiny_pipeline, part, *extra, "--resume_from_checkpoint", "latest"))
    a, b = final_weights(full), final_weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert "resumed from" in (part / "train.log").read_text()


def test_nan_loss_stops_and_keeps_the_last_checkpoint(tiny_pipeline, tmp_path):
    args = sd_args(tiny_pipeline, tmp_path / "o", "--learning_rate", "1e30", "--num_train_steps", "6",
                   "--checkpointing_steps", "1", "--max_grad_norm", "0", "--ema_decay", "0")
    with pytest.raises(UserError, match="loss became"):
        train_sdd.main(args)
    assert list((tmp_path / "o").glob("checkpoint-*")) and not (tmp_path / "o" / "unet").exists()


def test_refuses_to_overwrite_a_finished_run(tiny_pipeline, tmp_path):
    train_sdd.main(sd_args(tiny_pipeline, tmp_path / "o", "--checkpointing_steps", "1", "--validation_prompts", "a",
                           "--validation_steps", "1"))
    with pytest.raises(UserError, match="finished run"):
        train_sdd.main(sd_args(tiny_pipeline, tmp_path / "o"))
    # --overwrite_output_dir replaces the whole run: none of the old checkpoints or grids stay to be mixed with ours,
    # also with --resume_from_checkpoint latest (the run scripts pass it); what the run did not write stays
    mine = [tmp_path / "o" / n for n in ("checkpoint-notes.txt", "erasure_backup.safetensors", "checkpoint-3-keep")]
    for p in mine:
        p.write_text("mine")
    train_sdd.main(sd_args(tiny_pipeline, tmp_path / "o", "--overwrite_output_dir", "--checkpointing_steps", "2",
                           "--learning_rate", "1e-4", "--resume_from_checkpoint", "latest"))
    assert all(p.read_text() == "mine" for p in mine)
    assert sorted(p.name for p in (tmp_path / "o").glob("checkpoint-[0-9]")) == ["checkpoint-2"]
    assert '"learning_rate": 0.0001' in (tmp_path / "o" / "checkpoint-2" / "run.json").read_text()
    assert not (tmp_path / "o" / "validation").exists() and (tmp_path / "o" / "unet").is_dir()
    umask = os.umask(0)
    os.umask(umask)
    for folder in ("unet", "checkpoint-2"):  # written through a temp folder, yet as mkdir would make them
        assert (tmp_path / "o" / folder).stat().st_mode & 0o777 == 0o777 & ~umask
    from utils.saving import atomic_dir

    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o2775)  # a group folder: what is made in it keeps the group bit
    with atomic_dir(shared / "x"):
        pass
    (shared / "y").mkdir()
    assert (shared / "x").stat().st_mode & 0o7777 == (shared / "y").stat().st_mode & 0o7777


def test_resume_names_a_checkpoint_in_the_output_dir_and_not_one_past_the_end(tiny_pipeline, tmp_path):
    part = partial_run(tiny_pipeline, tmp_path)
    (part / "checkpoint-1").rename(part / "checkpoint-2")  # a checkpoint past the end of a 1-step run
    with pytest.raises(UserError, match="checkpoint-2 is past --num_train_steps 1"):
        train_sdd.main(sd_args(tiny_pipeline, part, "--resume_from_checkpoint", "latest", "--num_train_steps", "1"))
    (part / "checkpoint-2").rename(part / "checkpoint-1")
    # a checkpoint written before a flag existed (here --concept_steps) resumes when the flag is left unset
    run_json = part / "checkpoint-1" / "run.json"
    saved = json.loads(run_json.read_text())
    assert saved.pop("concept_steps") is None
    run_json.write_text(json.dumps(saved))
    # as in the diffusers examples, a bare checkpoint name is looked up in --output_dir
    train_sdd.main(sd_args(tiny_pipeline, part, "--resume_from_checkpoint", "checkpoint-1"))
    assert f"resumed from {part / 'checkpoint-1'} at step 1" in (part / "train.log").read_text()


def test_a_number_saved_before_a_flag_took_one_value_per_concept_is_the_same_run_as_its_list():
    """A checkpoint from before --negative_guidance took a value per concept saved 2.0; the flag now parses to [2.0]."""
    assert same_flag_value(2.0, [2.0]) and same_flag_value([2.0], 2.0)
    assert not same_flag_value(2.0, [2.0, 1.5]) and not same_flag_value([1.5], 2.0)


def test_a_signal_while_validating_saves_a_checkpoint_and_one_while_finishing_waits(tiny_pipeline, tmp_path,
                                                                                    monkeypatch):
    from utils.cli import Stopped
    from utils.train.loop import Run

    drawn = Run.validate

    def interrupted(self):  # a real SIGINT, sent while the grid is drawn
        drawn(self)
        os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(Run, "validate", interrupted)
    flags = ("--validation_prompts", "a", "--validation_steps", "1", "--checkpointing_steps", "10")
    with pytest.raises(Stopped, match="stopped by SIGINT at step 1 of 3"):
        train_sdd.main(sd_args(tiny_pipeline, tmp_path / "o", *flags))
    assert [p.name for p in (tmp_path / "o").glob("checkpoint-*")] == ["checkpoint-1"]
    # resumed, the signal arrives during the final grid: the result is still written
    flags = ("--validation_prompts", "a", "--validation_steps", "10", "--checkpointing_steps", "10")
    train_sdd.main(sd_args(tiny_pipeline, tmp_path / "o", *flags, "--resume_from_checkpoint", "latest"))
    assert (tmp_path / "o" / "unet").is_dir() and (tmp_path / "o" / "erasure.safetensors").is_file()


@pytest.mark.parametrize("case,match", [
    (["--pretrained_model_name_or_path", "/no/such/model"], "does not exist"),
    (["--pretrained_model_name_or_path", "CompVis/stable-diffusion-v1-4"], "could not download"),
    (["--removing_concepts", "EMPTY"], "is empty"),
    (["--removing_concepts", "missing.txt"], "does not exist"),
    (["--resume_from_checkpoint", "/no/such/checkpoint-5"], "does not exist"),
    (["--resolution", "18"], "not divisible"),
    (["--checkpoints_total_limit", "-1"], "checkpoints_total_limit must be >= 0"),
    (["--ema_decay", "1.5"], r"ema_decay must be in \[0, 1\]"),
    (["--output_dir", "FILE/run"], "is a file, not a folder"),
])
def test_bad_input_is_one_line_and_writes_nothing(tiny_pipeline, tmp_path, case, match):
    (tmp_path / "empty.txt").write_text("\n  \n")
    (tmp_path / "afile").write_text("")
    case = [str(tmp_path / "empty.txt") if c == "EMPTY" else c.replace("FILE", str(tmp_path / "afile")) for c in case]
    out = tmp_path / "out"
    argv = ["--pretrained_model_name_or_path", str(tiny_pipeline), "--removing_concepts", "nudity",
            "--output_dir", str(out), *FAST, *case]
    with pytest.raises(UserError, match=match):
        train_sdd.main(train_sdd.parse_args(argv))
    assert not out.exists()


def run_script(*argv, **kw):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, *argv], cwd=ROOT, env=env, capture_output=True, text=True, **kw)


@pytest.mark.parametrize("argv", [["--removing_concepts", "nudity", "--finetuning_method", "bogus"],
                                  ["--removing_concepts", "nudity", "--pretrained_model_name_or_path", "/no/model"],
                                  ["--output_dir", "x"]])
def test_cli_errors_are_one_line_without_traceback(tmp_path, argv, monkeypatch, capsys):
    """The model error in a real process; the two argparse errors through the same entry point in this one (what
    `python train_esd.py` runs, cli.run, without paying the imports again)."""
    argv = [*argv, "--output_dir", str(tmp_path / "o")]
    if "/no/model" in argv:
        r = run_script("train_esd.py", *argv)
        code, stderr = r.returncode, r.stderr
    else:
        code, stderr = run_entry(monkeypatch, capsys, "train_esd.py", train_esd.main, train_esd.parse_args, argv)
    assert code != 0 and "Traceback" not in stderr
    assert len([ln for ln in stderr.splitlines() if "error" in ln]) == 1
    assert not (tmp_path / "o").exists()


def _wait_for_step(out: Path, step: int, proc: subprocess.Popen, timeout: float = 180) -> None:
    """Wait until the run in `out` has logged `step` (or the process ended)."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        log = out / "train.log"
        if log.exists() and f"step {step} " in log.read_text():
            return
        time.sleep(0.2)


def test_sigterm_saves_a_checkpoint_exits_143_with_the_hint_last_and_resume_finishes(tiny_pipeline, tmp_path):
    out = tmp_path / "o"
    argv = ["--pretrained_model_name_or_path", str(tiny_pipeline), "--removing_concepts", "nudity",
            "--num_train_steps", "100000", "--num_ddim_steps", "2", "--output_dir", str(out), "--device", "cpu"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "train_sdd.py", *argv], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    _wait_for_step(out, 2, proc)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 143, output
    ckpts = list(out.glob("checkpoint-*"))
    assert len(ckpts) == 1 and not (out / "unet").exists()
    step = int(ckpts[0].name.split("-")[1])
    last = output.strip().splitlines()[-1]
    assert last.startswith(f"stopped by SIGTERM at step {step} ") and str(ckpts[0]) in last
    assert "rerun the same command with --resume_from_checkpoint latest" in last
    # the hint works: the same command with --resume_from_checkpoint latest (the old run went on without limit,
    # so here it is extended by two steps: its --num_train_steps does not define a constant-lr run)
    argv[5] = str(step + 2)
    train_sdd.main(train_sdd.parse_args([*argv, "--resume_from_checkpoint", "latest"]))
    assert (out / "unet").exists() and f"resumed from {ckpts[0]} at step {step}" in (out / "train.log").read_text()


def test_sigint_stops_the_demo_script_with_130_before_its_next_command(tiny_pipeline, tmp_path):
    """Ctrl-C (SIGINT to the whole process group) in a `set -e` script: checkpoint, hint last, nothing after it."""
    out = tmp_path / "o"
    cmd = ["bash", "run_sdd_toy.sh", str(out), "--pretrained_model_name_or_path", str(tiny_pipeline),
           "--num_train_steps", "100000", "--num_ddim_steps", "2", "--device", "cpu"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    _wait_for_step(out, 2, proc)
    os.killpg(proc.pid, signal.SIGINT)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, output
    assert output.strip().splitlines()[-1].startswith("stopped by SIGINT at step ")
    assert "to continue, rerun the same command (--output_dir" in output.strip().splitlines()[-1]
    assert list(out.glob("checkpoint-*")) and "does not exist" not in output  # `compare` did not run


def test_run_turns_stopped_into_its_exit_code_and_prints_the_hint_last(capsys):
    from utils.cli import Stopped, run

    def main(args):
        print("step output")
        raise Stopped("stopped by SIGTERM at step 3; to continue, rerun", signal.SIGTERM)

    with pytest.raises(SystemExit) as e:
        run(main, lambda argv: None)
    assert e.value.code == 143
    assert capsys.readouterr().err.strip().splitlines()[-1] == "stopped by SIGTERM at step 3; to continue, rerun"


def partial_run(pipe: Path, tmp_path: Path, *extra: str) -> Path:
    """A run stopped after its step-1 checkpoint: a one-step run's checkpoint and args.json in a fresh folder."""
    done = train_sdd.main(sd_args(pipe, tmp_path / "done", "--num_train_steps", "1", "--checkpointing_steps", "1",
                                  *extra))
    part = tmp_path / "part"
    shutil.copytree(done / "checkpoint-1", part / "checkpoint-1")
    shutil.copy(done / "args.json", part / "args.json")
    return part


def test_resume_with_other_flags_is_refused_naming_them_before_anything_is_written(tiny_pipeline, tmp_path):
    part = partial_run(tiny_pipeline, tmp_path)
    with pytest.raises(UserError) as e:
        train_sdd.main(sd_args(tiny_pipeline, part, "--resume_from_checkpoint", "latest", "--learning_rate", "1e-3",
                               "--seed", "5", "--removing_concepts", "nudity"))
    msg = str(e.value)
    assert "\n" not in msg and "--learning_rate 1e-05 (now 0.001)" in msg and "--seed 0 (now 5)" in msg
    assert "--removing_concepts ['nudity', 'red circle'] (now ['nudity'])" in msg
    assert "num_train_steps" not in msg and not (part / "train.log").exists()


def test_resume_with_neutral_flags_continues_and_keeps_args_json(tiny_pipeline, tmp_path):
    part = partial_run(tiny_pipeline, tmp_path)
    before = (part / "args.json").read_text()
    other_spelling = f"{tiny_pipeline.parent}/./{tiny_pipeline.name}/"  # the same model folder, typed differently
    train_sdd.main(sd_args(other_spelling, part, "--resume_from_checkpoint", "latest", "--checkpointing_steps", "7",
                           "--validation_prompts", "a cat", "--threads", "1"))  # FAST's 3 steps: extends the run
    assert (part / "args.json").read_text() == before and (part / "unet").exists()
    log = (part / "train.log").read_text()
    assert "resumed from" in log and '"checkpointing_steps": 7' in log  # the resumed invocation's flags are logged


def test_extending_a_run_whose_lr_schedule_depends_on_its_length_is_refused(tiny_pipeline, tmp_path):
    part = partial_run(tiny_pipeline, tmp_path, "--lr_scheduler", "cosine")
    with pytest.raises(UserError, match=r"--num_train_steps 1 \(now 3\)"):
        train_sdd.main(sd_args(tiny_pipeline, part, "--resume_from_checkpoint", "latest", "--lr_scheduler", "cosine"))


def test_a_finished_run_is_not_continued_without_overwrite(tiny_pipeline, tmp_path):
    done = train_sdd.main(sd_args(tiny_pipeline, tmp_path / "o", "--checkpointing_steps", "1"))
    before = (done / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns
    with pytest.raises(UserError, match="finished run"):
        train_sdd.main(sd_args(tiny_pipeline, done, "--resume_from_checkpoint", "latest", "--num_train_steps", "5"))
    assert (done / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns == before


def test_stop_on_signal_names_the_step_the_checkpoint_and_how_to_continue(tmp_path):
    """The one message the trainers and the attack end with when a signal stops them."""
    from utils.train.checkpoints import StopOnSignal

    with StopOnSignal() as stop:
        os.kill(os.getpid(), signal.SIGTERM)  # handled: a flag, not an exit
    assert stop.raised
    e = stop.stopped(3, 10, tmp_path / "checkpoint-3", tmp_path, resumed_latest=False)
    assert e.exit_code == 143 and str(e) == (f"stopped by SIGTERM at step 3 of 10; saved {tmp_path / 'checkpoint-3'}; "
                                             "to continue, rerun the same command with --resume_from_checkpoint latest "
                                             f"(--output_dir {tmp_path})")
    assert "to continue, rerun the same command (" in str(stop.stopped(3, 10, None, tmp_path, resumed_latest=True))
