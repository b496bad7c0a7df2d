"""The attack's and the toy trainer's resumable loops on the trainer's machinery (utils/train/checkpoints.py):
checkpoint-N/{state.pt, run.json} written atomically and pruned, save-then-stop on SIGINT, the one-line refusal of a
resume under other defining flags (the trainer's message) or of an old format, and a training time that adds up
every leg of a stopped and resumed run."""
from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from utils.cli import Stopped, UserError  # noqa: E402
from utils.train.checkpoints import list_checkpoints, load_state, run_steps, save_state  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def refusal(ckpt: Path, diffs: str) -> str:
    """check_same_run's one line, as the SDD/ESD trainer words it."""
    return (f"checkpoint {ckpt} belongs to a run with other flags: {diffs}; resume with its flags "
            f"({ckpt / 'run.json'}) or start a new --output_dir")


# ------------------------------------------------------------------------------------------- the shared loop
def test_run_steps_saves_after_the_step_under_way_then_stops_and_prunes(tmp_path):
    done, saved = [], []

    def train_step(step):
        done.append(step)
        if step == 4:
            signal.raise_signal(signal.SIGINT)  # arrives during step 4 -> 5

    def save(step):
        saved.append(step)
        return save_state(tmp_path, step, {"x": step}, {"lr": 0.1}, limit=2)

    with pytest.raises(Stopped) as stopped:
        run_steps(0, 10, train_step, save, 3, out=tmp_path, resumed_latest=False)
    assert done == [0, 1, 2, 3, 4] and saved == [3, 5]
    assert stopped.value.exit_code == 130
    assert f"stopped by SIGINT at step 5 of 10; saved {tmp_path / 'checkpoint-5'}" in str(stopped.value)
    assert "rerun the same command with --resume_from_checkpoint latest" in str(stopped.value)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-3", "checkpoint-5"]
    assert json.loads((tmp_path / "checkpoint-5" / "run.json").read_text()) == {"lr": 0.1}
    assert load_state(tmp_path / "checkpoint-5") == {"step": 5, "x": 5}
    ended = []
    assert run_steps(5, 10, train_step, save, 3, out=tmp_path, resumed_latest=True, save_last=True,
                     ended=ended.append) == 10
    assert saved == [3, 5, 6, 9, 10] and ended == [10] and signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-9", "checkpoint-10"]  # pruned to 2


def test_load_state_refuses_other_kinds_and_unreadable_files_in_one_line(tmp_path):
    save_state(tmp_path, 1, {"kind": "toy-vae"}, {}, None)
    assert load_state(tmp_path / "checkpoint-1", kind="toy-vae")["step"] == 1
    with pytest.raises(UserError, match="not written by the toy trainer's unet phase in this version") as e:
        load_state(tmp_path / "checkpoint-1", kind="toy-unet", what="the toy trainer's unet phase")
    assert "\n" not in str(e.value)
    (tmp_path / "checkpoint-2").mkdir()
    (tmp_path / "checkpoint-2" / "state.pt").write_text("not a checkpoint")
    with pytest.raises(UserError, match="cannot be read") as e:
        load_state(tmp_path / "checkpoint-2")
    assert "\n" not in str(e.value)


# ---------------------------------------------------------------------------------------------------- the toy
TOY = ["--n_images", "48", "--vae_steps", "2", "--unet_steps", "4", "--vae_batch_size", "4", "--unet_batch_size",
       "4", "--checkpoint_every", "3", "--quiet", "--threads", "1"]  # one thread in every run that is compared


def _toy(out: Path, *flags: str):
    from utils.toy.cli import main, parse_args

    return main(parse_args(["train", "--output_dir", str(out), *TOY, *flags]))


def test_toy_training_stopped_and_resumed_equals_one_run_and_refuses_other_flags(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from utils.toy import train as T

    _toy(tmp_path / "straight")
    lr_at = T._lr_at

    def signalled(step, total, warmup):  # called by sched.step() at the end of U-Net step 2 (of 4)
        if total == 4 and step == 2:
            signal.raise_signal(signal.SIGINT)
        return lr_at(step, total, warmup)

    monkeypatch.setattr(T, "_lr_at", signalled)
    out = tmp_path / "stopped"
    with pytest.raises(Stopped, match=r"at step 2 of 4; .* to continue, rerun the same command \(--output_dir"):
        _toy(out)
    monkeypatch.setattr(T, "_lr_at", lr_at)
    assert sorted(p.name for p in (out / "checkpoints" / "unet").iterdir()) == ["checkpoint-2"]
    assert {p.name for p in (out / "checkpoints" / "unet" / "checkpoint-2").iterdir()} == {"state.pt", "run.json"}
    log = (out / "train_toy.log").read_text()
    vae = out / "checkpoints" / "vae" / "checkpoint-2"
    with pytest.raises(UserError) as e:
        _toy(out, "--unet_lr", "0.002", "--quiet")
    assert str(e.value) == refusal(vae, "--unet_lr 0.001 (now 0.002)")
    assert (out / "train_toy.log").read_text() == log  # refused before anything is written
    _toy(out, "--checkpoint_every", "2")  # a neutral flag may change
    assert "unet: resumed from" in (out / "train_toy.log").read_text()
    for part in ("unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors",
                 "vae/diffusion_pytorch_model.safetensors"):
        a, b = load_file(tmp_path / "straight" / part), load_file(out / part)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part


def test_toy_refuses_an_old_format_checkpoint_in_one_line(tmp_path):
    out = tmp_path / "old"
    (out / "checkpoints").mkdir(parents=True)
    torch.save({"step": 1}, out / "checkpoints" / "vae.pt")  # the layout before checkpoint-N/ folders
    with pytest.raises(UserError, match="older version of the toy trainer and cannot be resumed") as e:
        _toy(out)
    assert "\n" not in str(e.value) and not (out / "train_toy.log").exists()


# ------------------------------------------------------------------------------------------------- the attack
def _attack_args(out: Path, *flags: str):
    from attack import parse_args

    return parse_args(["--pretrained_model_name_or_path", str(out.parent / "never-loaded"), "--concept", "red",
                       "--metric", "toy", "--prompts", "a {} circle", "--num_train_steps", "4",
                       "--learning_rate", "0.05", "--device", "cpu", "--output_dir", str(out), *flags])


def test_attack_resume_under_other_flags_is_refused_with_the_trainers_message(tmp_path):
    from attack import main
    from utils.attack.inversion import attack_identity

    out = tmp_path / "attack"
    args = _attack_args(out)
    save_state(out, 2, {"learned": torch.zeros(1, 4), "tokens": ["<red>"]}, attack_identity(args), None)
    (out / "args.json").write_text(json.dumps(vars(args), default=str))
    with pytest.raises(UserError) as e:  # refused before the model is loaded (its path does not exist)
        main(_attack_args(out, "--resume_from_checkpoint", "latest", "--learning_rate", "0.1", "--seed", "3"))
    assert str(e.value) == refusal(out / "checkpoint-2", "--learning_rate 0.05 (now 0.1), --seed 0 (now 3)")
    assert not (out / "attack.log").exists()


# ------------------------------------------------------------------------------------------- training time
LOG = """\
2026-01-01 09:00:00,000 INFO args {"seed": 1}
2026-01-01 09:00:01,000 INFO training starts at step 0 of 10
2026-01-01 09:00:09,000 INFO trained 10 steps in 8.0 s
2026-01-01 10:00:00,000 INFO args {"seed": 2, "overwrite_output_dir": true}
2026-01-01 10:00:05,000 INFO training starts at step 0 of 10
2026-01-01 10:00:20,000 INFO step 3 loss 0.1 concept 'red' k 2 t 500 lr 1e-05
2026-01-01 10:00:25,000 INFO saved out/checkpoint-3
2026-01-01 10:00:40,000 INFO args {"seed": 2}
2026-01-01 10:00:44,500 INFO training starts at step 3 of 10
2026-01-01 10:00:50,000 INFO step 5 loss 0.1 concept 'red' k 2 t 500 lr 1e-05
2026-01-01 10:00:55,000 INFO saved out/checkpoint-5
2026-01-01 10:00:55,250 INFO stopped by SIGINT at step 5 of 10; saved out/checkpoint-5; to continue, rerun
2026-01-01 10:10:00,000 INFO args {"seed": 2}
2026-01-01 10:10:10,000 INFO training starts at step 5 of 10
2026-01-01 10:10:40,000 INFO trained 10 steps in 30.5 s
"""


def test_training_seconds_add_up_every_leg_of_the_last_run(tmp_path):
    from utils.toy.cli import training_seconds
    from utils.train.log_time import training_seconds_in

    # a killed leg (20 s to its last line), a stopped one (10.75 s), the last one's own time; not the older run's 8 s
    assert training_seconds_in(LOG) == pytest.approx(20 + 10.75 + 30.5)
    assert training_seconds_in(LOG.split("2026-01-01 10:00:00")[0]) == 8.0
    assert training_seconds_in("2026-01-01 09:00:09,000 INFO trained 10 steps in 8.0 s\n") == 8.0  # no start line
    assert training_seconds_in("") is None
    (tmp_path / "unet").mkdir()
    (tmp_path / "train.log").write_text(LOG)
    assert training_seconds(tmp_path / "unet") == pytest.approx(61.25)
    assert training_seconds(tmp_path / "elsewhere" / "unet") is None
