"""End-to-end and unit tests of the training core (train_sdd.py, train_esd.py, utils/*) on tiny pipelines."""
from __future__ import annotations

import copy
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from safetensors import safe_open

import train_esd
import train_sdd
from docs_util import doc_training_commands
from utils.cli import UserError
from utils.concepts import concept_schedule
from utils.params import FINETUNING_METHODS, trainable_parameters
from utils.sampling import TrajectoryQueue, partial_trajectory, trajectory_points
from utils.tiny import tiny_unet
from utils.trainer import Setup
from utils.views import call, ema_update, snapshot

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--num_train_steps", "3", "--num_ddim_steps", "4", "--device", "cpu"]


def sd_args(pipe, out, *extra):
    return train_sdd.parse_args(["--pretrained_model_name_or_path", str(pipe), "--output_dir", str(out),
                                 "--removing_concepts", "nudity", "red circle", *FAST, *extra])


def esd_args(pipe, out, *extra):
    return train_esd.parse_args(["--pretrained_model_name_or_path", str(pipe), "--output_dir", str(out),
                                 "--removing_concepts", "nudity", "red circle", *FAST, *extra])


def moved(base: Path, out: Path) -> set[str]:
    """Names of U-Net tensors that differ between the base pipeline and OUT/unet."""
    a = UNet2DConditionModel.from_pretrained(base / "unet").state_dict()
    b = UNet2DConditionModel.from_pretrained(out / "unet").state_dict()
    assert a.keys() == b.keys()
    return {k for k in a if not torch.equal(a[k], b[k])}


@pytest.mark.parametrize("script", ["sdd", "esd"])
def test_end_to_end_only_cross_attention_moves(tiny_pipeline, tmp_path, script):
    args = (sd_args if script == "sdd" else esd_args)(tiny_pipeline, tmp_path / "out", "--learning_rate", "1e-3",
                                                      "--validation_prompts", "a cat", "--validation_steps", "2",
                                                      "--checkpointing_steps", "2")
    (train_sdd if script == "sdd" else train_esd).main(args)
    out = tmp_path / "out"
    for f in ["unet/config.json", "unet/diffusion_pytorch_model.safetensors", "erasure.safetensors", "args.json",
              "train.log", "validation/step-2.png", "validation/step-3.png", "checkpoint-2/state.pt"]:
        assert (out / f).exists(), f
    changed = moved(tiny_pipeline, out)
    assert changed and all(".attn2." in k for k in changed)
    # the pipeline runs with the erased U-Net
    pipe = StableDiffusionPipeline.from_pretrained(tiny_pipeline, unet=UNet2DConditionModel.from_pretrained(out / "unet"))
    img = pipe("a cat", num_inference_steps=2, output_type="np").images
    assert img.shape[0] == 1 and torch.isfinite(torch.from_numpy(img)).all()
    # the erasure file holds exactly the trained tensors, with metadata, and is a few % of the U-Net
    with safe_open(str(out / "erasure.safetensors"), "pt") as f:
        keys, meta = set(f.keys()), f.metadata()
    unet = UNet2DConditionModel.from_pretrained(out / "unet")
    assert keys == {n for n, _ in unet.named_parameters() if ".attn2." in n}
    assert meta["method"] == script and meta["base_model"] == str(tiny_pipeline) and "red circle" in meta["concepts"]
    assert "trains" in (out / "train.log").read_text()


def test_noxattn_trains_everything_but_cross_attention_time_and_output(tiny_pipeline, tmp_path):
    train_esd.main(esd_args(tiny_pipeline, tmp_path / "o", "--finetuning_method", "noxattn", "--learning_rate", "1e-3"))
    changed = moved(tiny_pipeline, tmp_path / "o")
    assert changed
    assert not any(".attn2." in k or k.startswith(("time_embedding", "conv_out")) for k in changed)
    assert any(".attn1." in k for k in changed) and any("resnets" in k for k in changed)


def test_registry_picks_the_documented_layers():
    unet = tiny_unet()
    names = [n for n, _ in unet.named_parameters()]
    sub = {m: set(trainable_parameters(unet, m)) for m in FINETUNING_METHODS}
    assert sub["xattn"] == {n for n in names if ".attn2." in n}
    assert sub["xattn-strict"] == {n for n in names if ".attn2.to_k." in n or ".attn2.to_v." in n}
    assert sub["selfattn"] == {n for n in names if ".attn1." in n}
    assert sub["full"] == set(names)
    assert sub["notime"] == {n for n in names if not n.startswith(("time_embedding", "conv_out"))}
    assert sub["noxattn"] == sub["notime"] - sub["xattn"]
    trainable_parameters(unet, "xattn")
    assert {n for n, p in unet.named_parameters() if p.requires_grad} == sub["xattn"]


def test_ema_math_touches_only_the_subset():
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    subset = {"1.weight": module[1].weight}
    frozen_before = module[0].weight.detach().clone()
    teacher = snapshot(subset)
    t0 = teacher["1.weight"].clone()
    with torch.no_grad():
        module[1].weight.add_(1.0)
    ema_update(teacher, subset, 0.9)
    assert torch.allclose(teacher["1.weight"], 0.9 * t0 + 0.1 * module[1].weight)
    assert torch.equal(module[0].weight, frozen_before)
    assert teacher.keys() == subset.keys() and teacher["1.weight"].data_ptr() != module[1].weight.data_ptr()


def test_teacher_view_equals_a_full_copy_without_holding_one(tiny_pipeline):
    unet = UNet2DConditionModel.from_pretrained(tiny_pipeline / "unet")
    args = train_sdd.parse_args(["--removing_concepts", "x", "--ema_decay", "0.5"])
    subset = trainable_parameters(unet, "xattn")
    sdd = train_sdd.SDD(Setup(unet, subset, args, ["x"]))
    with torch.no_grad():
        for p in subset.values():
            p.add_(0.1)
    sdd.after_step()
    # the teacher holds only the trained tensors ...
    held = sum(t.numel() for t in sdd.teacher.values())
    assert held == sum(p.numel() for p in subset.values()) < 0.2 * sum(p.numel() for p in unet.parameters())
    # ... and running the shared module with them equals a deep copy loaded with the EMA weights
    ref = copy.deepcopy(unet)
    ref.load_state_dict({**unet.state_dict(), **sdd.teacher})
    z, emb = torch.randn(1, 4, 8, 8), torch.randn(1, 16, 32)
    with torch.no_grad():
        a = call(unet, sdd.teacher, z, torch.tensor(500), encoder_hidden_states=emb).sample
        b = ref(z, torch.tensor(500), encoder_hidden_states=emb).sample
        c = unet(z, torch.tensor(500), encoder_hidden_states=emb).sample
    assert torch.allclose(a, b, atol=1e-6) and not torch.allclose(a, c, atol=1e-4)


@pytest.mark.parametrize("k", [0, 1, 5])
def test_partial_sampling_timestep_and_number_of_steps(k):
    n = 6
    unet = tiny_unet()
    sched = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                          set_alpha_to_one=False, steps_offset=1)
    sched.set_timesteps(n)
    calls = []
    unet.register_forward_pre_hook(lambda m, a: calls.append(1))
    z_T = torch.randn(2, 4, 8, 8)
    z, t = partial_trajectory(unet, None, sched, z_T, torch.randn(1, 16, 32), torch.randn(1, 16, 32), 3.0, k)
    assert int(t) == int(sched.timesteps[k]) and len(calls) == k  # k = 0: pure noise, no step (no off-by-one)
    assert torch.equal(z, z_T) == (k == 0) and z.shape == z_T.shape
    with pytest.raises(ValueError):
        partial_trajectory(unet, None, sched, z_T, torch.randn(1, 16, 32), torch.randn(1, 16, 32), 3.0, n)


def test_trajectory_points_equal_separate_partial_trajectories():
    unet = tiny_unet()
    sched = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                          set_alpha_to_one=False, steps_offset=1)
    sched.set_timesteps(5)
    z_T, c, u = torch.randn(2, 4, 8, 8), torch.randn(1, 16, 32), torch.randn(1, 16, 32)
    zs, ts = trajectory_points(unet, None, sched, z_T, c, u, 3.0, [0, 2, 4])
    assert zs.shape == (6, 4, 8, 8) and ts.tolist() == [int(sched.timesteps[k]) for k in (0, 0, 2, 2, 4, 4)]
    for i, k in enumerate([0, 2, 4]):
        z, t = partial_trajectory(unet, None, sched, z_T, c, u, 3.0, k)
        assert torch.allclose(zs[2 * i:2 * i + 2], z, atol=1e-6) and int(t) == int(ts[2 * i])


@pytest.mark.parametrize("script", ["sdd", "esd"])
def test_trajectory_samples_flag_trains(tiny_pipeline, tmp_path, script):
    mod, make = (train_sdd, sd_args) if script == "sdd" else (train_esd, esd_args)
    out = mod.main(make(tiny_pipeline, tmp_path / "o", "--trajectory_samples", "3", "--timestep_jitter",
                        "--train_batch_size", "2", "--learning_rate", "1e-3"))
    assert moved(tiny_pipeline, out)
    with pytest.raises(UserError, match="trajectory_samples"):
        mod.main(make(tiny_pipeline, tmp_path / "p", "--trajectory_samples", "5"))


def test_trajectory_queue_serves_r_micro_steps_from_one_trajectory():
    torch.manual_seed(0)
    unet, sched = tiny_unet().eval(), DDIMScheduler(num_train_timesteps=1000)
    sched.set_timesteps(8)
    calls = []
    unet.register_forward_hook(lambda *a: calls.append(1))
    embeds, u = {"x": torch.randn(1, 16, 32)}, torch.randn(1, 16, 32)
    queue, gen = TrajectoryQueue(8, samples=2, reuse=3), torch.Generator().manual_seed(0)
    items = [queue.next(unet, None, sched, (2, 4, 16, 16), torch.device("cpu"), embeds, "x", u, 3.0, gen)
             for _ in range(3)]
    ks = [int(sched.timesteps.tolist().index(int(t))) for it in items for t in it["t"][::2]]
    assert len(set(ks)) == 6 and len(calls) == max(ks)  # 6 distinct k, one pass of the teacher to the largest
    assert all(it["k"] == max(ks[2 * i:2 * i + 2]) and it["z"].shape == (4, 4, 16, 16) for i, it in enumerate(items))
    gen = torch.Generator().manual_seed(0)  # replay the queue's draws: the k permutation, then z_T
    torch.randperm(8, generator=gen)
    z_T = torch.randn((2, 4, 16, 16), generator=gen)
    z, _ = partial_trajectory(unet, None, sched, z_T, embeds["x"], u, 3.0, ks[3])
    assert torch.allclose(items[1]["z"][2:], z, atol=1e-6)  # the same points a fresh trajectory would give
    queue.next(unet, None, sched, (2, 4, 16, 16), torch.device("cpu"), embeds, "x", u, 3.0, gen)
    assert len(calls) > max(ks)  # the queue ran dry: a new trajectory
    with pytest.raises(ValueError, match="samples \\* reuse"):
        TrajectoryQueue(8, samples=3, reuse=3)


def test_trajectory_reuse_keeps_the_concept_of_its_trajectory(tiny_pipeline, tmp_path):
    out = train_sdd.main(sd_args(tiny_pipeline, tmp_path / "o", "--num_train_steps", "6", "--trajectory_reuse", "2",
                                 "--removal_target", "current"))
    concepts = [line.split("concept ")[1].split(" k ")[0] for line in (out / "train.log").read_text().splitlines()
                if " loss " in line]
    assert concepts == ["'nudity'", "'red circle'"] * 3  # the concept schedule is kept
    # one trajectory per concept serves that concept's two steps: the first of each pair samples, the second does not
    ks = [int(line.split(" k ")[1].split()[0]) for line in (out / "train.log").read_text().splitlines() if " loss " in line]
    assert ks[0] != ks[2] and ks[1] != ks[3]  # two distinct k of one trajectory
    with pytest.raises(UserError, match="trajectory_reuse"):
        train_sdd.main(sd_args(tiny_pipeline, tmp_path / "p", "--trajectory_reuse", "3", "--trajectory_samples", "2"))


def test_v_prediction_model_trains_and_samples(tiny_vpred_pipeline, tmp_path):
    train_sdd.main(sd_args(tiny_vpred_pipeline, tmp_path / "o", "--learning_rate", "1e-3"))
    pipe = StableDiffusionPipeline.from_pretrained(tiny_vpred_pipeline,
                                                   unet=UNet2DConditionModel.from_pretrained(tmp_path / "o" / "unet"))
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    assert pipe("a cat", num_inference_steps=2, output_type="np").images.shape[0] == 1
    assert moved(tiny_vpred_pipeline, tmp_path / "o")


def test_concept_schedules():
    c = ["a", "b", "c"]
    assert concept_schedule(c, "iterative", 7, 0) == ["a", "b", "c", "a", "b", "c", "a"]
    assert concept_schedule(c, "composite", 2, 0) == ["a, b, c"] * 2
    assert concept_schedule(c, "sequential", 6, 0) == ["a", "a", "b", "b", "c", "c"]
    assert concept_schedule(c, "sequential", 7, 0) == ["a", "a", "a", "b", "b", "c", "c"]
    r = concept_schedule(c, "random", 60, 1)
    assert r == concept_schedule(c, "random", 60, 1) and set(r) == set(c) and r != concept_schedule(c, "random", 60, 2)


def test_removal_target_current_uses_the_step_concept(tiny_pipeline, tmp_path):
    a = train_sdd.main(sd_args(tiny_pipeline, tmp_path / "all", "--learning_rate", "1e-3"))
    b = train_sdd.main(sd_args(tiny_pipeline, tmp_path / "cur", "--learning_rate", "1e-3", "--removal_target", "current"))
    ua = UNet2DConditionModel.from_pretrained(a / "unet").state_dict()
    ub = UNet2DConditionModel.from_pretrained(b / "unet").state_dict()
    assert any(not torch.equal(ua[k], ub[k]) for k in ua)


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    return UNet2DConditionModel.from_pretrained(out / "unet").state_dict()


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


def test_bf16_frozen_weights_train_and_save_fp32(tiny_pipeline, tmp_path):
    out = train_sdd.main(sd_args(tiny_pipeline, tmp_path / "o", "--mixed_precision", "bf16", "--learning_rate", "1e-3"))
    w = final_weights(out)
    assert all(v.dtype == torch.float32 for v in w.values())
    changed = moved(tiny_pipeline, out)
    assert changed and all(".attn2." in k for k in changed)  # frozen weights were not rounded to bf16 on save


def test_nan_loss_stops_and_keeps_the_last_checkpoint(tiny_pipeline, tmp_path):
    args = sd_args(tiny_pipeline, tmp_path / "o", "--learning_rate", "1e30", "--num_train_steps", "6",
                   "--checkpointing_steps", "1", "--max_grad_norm", "0", "--ema_decay", "0")
    with pytest.raises(UserError, match="loss became"):
        train_sdd.main(args)
    assert list((tmp_path / "o").glob("checkpoint-*")) and not (tmp_path / "o" / "unet").exists()


def test_refuses_to_overwrite_a_finished_run(tiny_pipeline, tmp_path):
    train_sdd.main(sd_args(tiny_pipeline, tmp_path / "o"))
    with pytest.raises(UserError, match="finished run"):
        train_sdd.main(sd_args(tiny_pipeline, tmp_path / "o"))
    train_sdd.main(sd_args(tiny_pipeline, tmp_path / "o", "--overwrite_output_dir"))


@pytest.mark.parametrize("case,match", [
    (["--pretrained_model_name_or_path", "/no/such/model"], "does not exist"),
    (["--pretrained_model_name_or_path", "CompVis/stable-diffusion-v1-4"], "could not download"),
    (["--removing_concepts", "EMPTY"], "is empty"),
    (["--removing_concepts", "missing.txt"], "does not exist"),
    (["--resume_from_checkpoint", "/no/such/checkpoint-5"], "does not exist"),
    (["--resolution", "18"], "not divisible"),
])
def test_bad_input_is_one_line_and_writes_nothing(tiny_pipeline, tmp_path, case, match):
    (tmp_path / "empty.txt").write_text("\n  \n")
    case = [str(tmp_path / "empty.txt") if c == "EMPTY" else c for c in case]
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
def test_cli_errors_are_one_line_without_traceback(tmp_path, argv):
    r = run_script("train_esd.py", *argv, "--output_dir", str(tmp_path / "o"))
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert len([ln for ln in r.stderr.splitlines() if "error" in ln]) == 1
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


def test_mixed_precision_starts_from_unrounded_fp32_weights(tiny_pipeline, tmp_path):
    out = train_esd.main(esd_args(tiny_pipeline, tmp_path / "o", "--mixed_precision", "bf16", "--learning_rate", "0",
                                  "--num_train_steps", "1"))
    base = UNet2DConditionModel.from_pretrained(tiny_pipeline / "unet").state_dict()
    with safe_open(str(out / "erasure.safetensors"), "pt") as f:
        assert all(torch.equal(f.get_tensor(k), base[k]) for k in f.keys())


def test_conv_autotune_matches_stock_kernels(tiny_pipeline, tmp_path):
    from utils import convtune
    torch.manual_seed(0)
    conv, x = torch.nn.Conv2d(8, 16, 3, padding=1), torch.randn(2, 8, 6, 6, requires_grad=True)
    ref = conv(x)
    ref.sum().backward()
    g_ref, x.grad = x.grad.clone(), None
    assert convtune.autotune_convolutions(conv, torch.device("cpu")) == 1
    out = conv(x)
    out.sum().backward()
    key = next(k for k in convtune._CHOICE if k[0] == (2, 8, 6, 6) and k[1] == (16, 8, 3, 3))
    assert isinstance(convtune._CHOICE[key], bool)  # timed once, remembered
    assert torch.allclose(out, ref, atol=1e-5) and torch.allclose(x.grad, g_ref, atol=1e-5)
    # a whole run: same result as untuned kernels up to rounding; the choice is logged before training starts
    a = train_sdd.main(sd_args(tiny_pipeline, tmp_path / "a", "--learning_rate", "1e-3"))
    b = train_sdd.main(sd_args(tiny_pipeline, tmp_path / "b", "--learning_rate", "1e-3", "--conv_autotune"))
    wa, wb = final_weights(a), final_weights(b)
    assert all(torch.allclose(wa[k], wb[k], atol=1e-5) for k in wa)
    log = (b / "train.log").read_text()
    assert log.index("convolution kernels chosen per shape") < log.index("training starts")


# ---------------------------------------------------------------------------------------- issue 11: paper defaults
def script_argv(script: str, out: str = "OUT", *extra: str):
    """(module, argv) of a run_*.sh script's python line, with its output folder and the flags appended to it."""
    text = (ROOT / script).read_text().replace("\\\n", " ")
    line = next(ln for ln in text.splitlines() if ln.strip().startswith("python ") and "train_" in ln)
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
        assert (args.negative_guidance, args.weight_decay, args.max_grad_norm) == (3.0, 1e-4, 1.0)
        assert (args.learning_rate, args.num_train_steps, args.guidance_scale) == (1e-5, 1000, 3.0)
    assert x.finetuning_method == "xattn" and u.finetuning_method == "noxattn"
    defaults = train_esd.parse_args(["--removing_concepts", "x"])  # the script's values are also train_esd's defaults
    assert (defaults.negative_guidance, defaults.weight_decay, defaults.max_grad_norm) == (3.0, 1e-4, 1.0)


@pytest.mark.parametrize("script", ["run_sdd_nudity.sh", "run_esd_nudity.sh"])
def test_paper_scripts_train_in_fp32_and_take_the_small_gpu_form(script):
    args = script_args(script)
    assert args.mixed_precision == "no" and not args.gradient_checkpointing and not args.allow_tf32
    small = script_args(script, "--mixed_precision", "bf16", "--gradient_checkpointing")
    assert small.mixed_precision == "bf16" and small.gradient_checkpointing
    assert "--mixed_precision bf16 --gradient_checkpointing" in (ROOT / script).read_text()  # documented there


def test_sampling_prompt_and_removal_target_choices(capsys):
    from utils.concepts import step_prompts
    c = ["nudity", "red circle"]
    assert step_prompts("nudity", c) == ("nudity", "nudity, red circle")            # paper: sample c_p, remove c_s
    assert step_prompts("nudity", c, "all", "current") == ("nudity, red circle", "nudity")  # reference code
    args = train_sdd.parse_args(["--removing_concepts", "x"])
    assert (args.sampling_concept, args.removal_target) == ("current", "all")
    with pytest.raises(SystemExit):
        train_sdd.parse_args(["--help"])
    text = capsys.readouterr().out
    for flag, paper, reference in (("--sampling_concept", "current", "all"), ("--removal_target", "all", "current")):
        helptext = " ".join(text.split(f"\n  {flag} {{")[1].split("\n  --")[0].split())
        assert f"'{paper}' = " in helptext.split("(paper, Alg. 1)")[0] and "(reference code)" in helptext
        assert f"'{reference}' = " in helptext.split("(paper, Alg. 1)")[1]
        assert f"(default: {paper})" in helptext


def test_sampling_with_the_joined_string_samples_what_composite_samples(tiny_pipeline, tmp_path):
    # with --sampling_concept all and --removal_target all every step samples and removes the joined string, which is
    # exactly what --concept_method composite does: the same weights, bit for bit
    a = train_sdd.main(sd_args(tiny_pipeline, tmp_path / "a", "--learning_rate", "1e-3", "--sampling_concept", "all"))
    b = train_sdd.main(sd_args(tiny_pipeline, tmp_path / "b", "--learning_rate", "1e-3", "--concept_method", "composite"))
    wa, wb = final_weights(a), final_weights(b)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    # the paper's default (sample c_p) is a different run
    c = train_sdd.main(sd_args(tiny_pipeline, tmp_path / "c", "--learning_rate", "1e-3"))
    wc = final_weights(c)
    assert any(not torch.equal(wa[k], wc[k]) for k in wa)


def test_timestep_jitter_draws_from_t_to_t_plus_stride_inside_the_schedule():
    from utils.sampling import jitter_timestep
    sched = DDIMScheduler(num_train_timesteps=1000, steps_offset=1)
    sched.set_timesteps(10)  # stride 100; timesteps 901, 801, ..., 1
    t = sched.timesteps.repeat_interleave(2000)
    jt = jitter_timestep(t, sched, torch.Generator().manual_seed(0))
    off = jt - t
    assert off.min() == 0 and (jt < 1000).all()
    for ts in sched.timesteps.tolist():
        o = off[t == ts]
        top = min(100, 1000 - ts)  # the top bucket [901, 1000) is cut at T - 1
        assert int(o.min()) == 0 and int(o.max()) == top - 1
        assert abs(float(o.float().mean()) - (top - 1) / 2) < 0.1 * top  # uniform, not piled on an end


# ---------------------------------------------------------------------------------------- a resumed run is the same run
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


# ---------------------------------------------------------------------------------------- threads
def test_threads_auto_leaves_the_busy_cores_alone_and_an_explicit_count_wins(monkeypatch):
    from utils.cli import apply_threads
    before = torch.get_num_threads()
    cores = len(os.sched_getaffinity(0))
    try:
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        torch.set_num_threads(1)
        assert apply_threads(0, torch.device("cpu")) == 1  # the user's OMP_NUM_THREADS is kept
        monkeypatch.delenv("OMP_NUM_THREADS")
        monkeypatch.setattr(os, "getloadavg", lambda: (cores + 3.2, 0.0, 0.0))  # a machine busier than its cores
        assert apply_threads(0, torch.device("cpu")) == 1 == torch.get_num_threads()
        monkeypatch.setattr(os, "getloadavg", lambda: (0.3, 0.0, 0.0))  # an idle machine
        assert apply_threads(0, torch.device("cpu")) == cores == torch.get_num_threads()
        assert apply_threads(3, torch.device("cpu")) == 3 == torch.get_num_threads()
        torch.set_num_threads(2)
        assert apply_threads(0, torch.device("cuda")) == 2 == torch.get_num_threads()  # a GPU run: untouched
        with pytest.raises(UserError, match="--threads"):
            apply_threads(-1, torch.device("cpu"))
    finally:
        torch.set_num_threads(before)


def test_trainer_applies_and_logs_the_thread_count(tiny_pipeline, tmp_path):
    before = torch.get_num_threads()
    try:
        out = train_esd.main(esd_args(tiny_pipeline, tmp_path / "o", "--threads", "1", "--num_train_steps", "1"))
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    assert "device cpu, 1 torch threads" in (out / "train.log").read_text()


# ---------------------------------------------------------------------------------------- the docs' commands run
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


def test_stop_on_signal_names_the_step_the_checkpoint_and_how_to_continue(tmp_path):
    """The one message the trainers and the attack end with when a signal stops them."""
    from utils.checkpoints import StopOnSignal

    with StopOnSignal() as stop:
        os.kill(os.getpid(), signal.SIGTERM)  # handled: a flag, not an exit
    assert stop.raised
    e = stop.stopped(3, 10, tmp_path / "checkpoint-3", tmp_path, resumed_latest=False)
    assert e.exit_code == 143 and str(e) == (f"stopped by SIGTERM at step 3 of 10; saved {tmp_path / 'checkpoint-3'}; "
                                             "to continue, rerun the same command with --resume_from_checkpoint latest "
                                             f"(--output_dir {tmp_path})")
    assert "to continue, rerun the same command (" in str(stop.stopped(3, 10, None, tmp_path, resumed_latest=True))
