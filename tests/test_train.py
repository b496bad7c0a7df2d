"""End-to-end and unit tests of the training core (train_sdd.py, train_esd.py, utils/*) on tiny pipelines (runs as a
user meets them: test_train_runs.py; the run scripts and docs: test_train_scripts.py)."""
from __future__ import annotations

import os

import pytest
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from safetensors import safe_open

import train_esd
import train_sdd
from train_util import esd_args, final_weights, moved, sd_args
from utils.cli import UserError
from utils.families import FAMILIES

SD = FAMILIES["sd"]


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


@pytest.mark.parametrize("script", ["sdd", "esd"])
def test_trajectory_samples_flag_trains(tiny_pipeline, tmp_path, script):
    mod, make = (train_sdd, sd_args) if script == "sdd" else (train_esd, esd_args)
    out = mod.main(make(tiny_pipeline, tmp_path / "o", "--trajectory_samples", "3", "--timestep_jitter",
                        "--train_batch_size", "2", "--learning_rate", "1e-3"))
    assert moved(tiny_pipeline, out)
    with pytest.raises(UserError, match="trajectory_samples"):
        mod.main(make(tiny_pipeline, tmp_path / "p", "--trajectory_samples", "5"))


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


def test_loss_space_epsilon_trains_a_v_prediction_model(tiny_vpred_pipeline, tmp_path):
    out = train_esd.main(esd_args(tiny_vpred_pipeline, tmp_path / "e", "--loss_space", "epsilon"))
    plain = train_esd.main(esd_args(tiny_vpred_pipeline, tmp_path / "p"))
    losses = [[line.split(" loss ")[1].split()[0] for line in (o / "train.log").read_text(encoding="utf-8").splitlines()
               if " loss " in line] for o in (out, plain)]
    assert losses[0] and len(losses[0]) == len(losses[1]) and losses[0] != losses[1]
    assert moved(tiny_vpred_pipeline, out)


def test_concept_steps_give_each_concept_its_own_steps(tiny_pipeline, tmp_path):
    out = train_esd.main(esd_args(tiny_pipeline, tmp_path / "o", "--concept_method", "sequential",
                                  "--concept_steps", "1", "2"))
    log = (out / "train.log").read_text(encoding="utf-8")
    assert [log.count(f"concept {c!r}") for c in ("nudity", "red circle")] == [1, 2]
    for extra, match in [(["--concept_steps", "1", "2"], "needs --concept_method sequential"),
                         (["--concept_method", "sequential", "--concept_steps", "3"], "1 counts for 2 concepts"),
                         (["--concept_method", "sequential", "--concept_steps", "2", "2"], "pass --num_train_steps 4"),
                         (["--concept_method", "sequential", "--concept_steps", "3", "0"], ">= 1")]:
        with pytest.raises(UserError, match=match):
            train_esd.main(esd_args(tiny_pipeline, tmp_path / "bad", *extra))
    assert not (tmp_path / "bad").exists()


def test_per_concept_eta_must_fit_the_concepts(tiny_pipeline, tmp_path):
    for extra, match in [(["--negative_guidance", "2", "1", "1"], "3 values for 2 concepts"),
                         (["--negative_guidance", "2", "1", "--concept_method", "composite"],
                          "not --concept_method composite")]:
        with pytest.raises(UserError, match=match):
            train_esd.main(esd_args(tiny_pipeline, tmp_path / "bad", *extra))
    assert not (tmp_path / "bad").exists()


def test_removal_target_current_uses_the_step_concept(tiny_pipeline, tmp_path):
    a = train_sdd.main(sd_args(tiny_pipeline, tmp_path / "all", "--learning_rate", "1e-3"))
    b = train_sdd.main(sd_args(tiny_pipeline, tmp_path / "cur", "--learning_rate", "1e-3", "--removal_target", "current"))
    ua = UNet2DConditionModel.from_pretrained(a / "unet").state_dict()
    ub = UNet2DConditionModel.from_pretrained(b / "unet").state_dict()
    assert any(not torch.equal(ua[k], ub[k]) for k in ua)


def test_bf16_frozen_weights_train_and_save_fp32(tiny_pipeline, tmp_path):
    out = train_sdd.main(sd_args(tiny_pipeline, tmp_path / "o", "--mixed_precision", "bf16", "--learning_rate", "1e-3"))
    w = final_weights(out)
    assert all(v.dtype == torch.float32 for v in w.values())
    changed = moved(tiny_pipeline, out)
    assert changed and all(".attn2." in k for k in changed)  # frozen weights were not rounded to bf16 on save


def test_mixed_precision_starts_from_unrounded_fp32_weights(tiny_pipeline, tmp_path):
    out = train_esd.main(esd_args(tiny_pipeline, tmp_path / "o", "--mixed_precision", "bf16", "--learning_rate", "0",
                                  "--num_train_steps", "1"))
    base = UNet2DConditionModel.from_pretrained(tiny_pipeline / "unet").state_dict()
    with safe_open(str(out / "erasure.safetensors"), "pt") as f:
        assert all(torch.equal(f.get_tensor(k), base[k]) for k in f.keys())


def test_conv_autotune_matches_stock_kernels(tiny_pipeline, tmp_path):
    from utils.train import convtune
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


# ---------------------------------------------------------------------------------------- threads
def fake_proc_stat(monkeypatch, idle_share: dict[int, float]) -> None:
    """/proc/stat's two samples as if CPU c had been idle idle_share[c] of the time in between."""
    from utils import cli

    samples = iter([{c: (0, 0) for c in idle_share}, {c: (round(100 * f), 100) for c, f in idle_share.items()}])
    monkeypatch.setattr(cli, "_cpu_times", lambda: next(samples))
    monkeypatch.setattr(cli.time, "sleep", lambda s: None)


def test_threads_auto_takes_the_idle_cores_and_an_explicit_count_wins(monkeypatch, capsys):
    from utils.cli import apply_threads
    before = torch.get_num_threads()
    cpus = sorted(os.sched_getaffinity(0))
    try:
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        torch.set_num_threads(1)
        assert apply_threads(0, torch.device("cpu")) == 1  # the user's OMP_NUM_THREADS is kept
        assert capsys.readouterr().out == "using 1 torch thread (OMP_NUM_THREADS=1)\n"
        monkeypatch.delenv("OMP_NUM_THREADS")
        monkeypatch.setattr(os, "getloadavg", lambda: (len(cpus) + 3.2, 0.0, 0.0))  # what the last command left
        fake_proc_stat(monkeypatch, dict.fromkeys(cpus, 0.98))  # the cores are idle now
        assert apply_threads(0, torch.device("cpu")) == len(cpus) == torch.get_num_threads()
        assert capsys.readouterr().out == f"using {len(cpus)} torch thread{'s' * (len(cpus) > 1)} (auto: " \
                                          f"{0.98 * len(cpus):.1f} of {len(cpus)} cores idle)\n"  # said once
        fake_proc_stat(monkeypatch, dict.fromkeys(cpus, 0.02))  # every core busy: still one thread
        assert apply_threads(0, torch.device("cpu")) == 1 == torch.get_num_threads()
        if len(cpus) > 1:  # one core busy, another half idle: the one idle core and the half of one
            fake_proc_stat(monkeypatch, {**dict.fromkeys(cpus, 1.0), cpus[0]: 0.0, cpus[1]: 0.4})
            assert apply_threads(0, torch.device("cpu")) == max(1, len(cpus) - 2)
        fake_proc_stat(monkeypatch, {c + 1000: 1.0 for c in cpus})  # idle CPUs that are not ours count for nothing
        assert apply_threads(0, torch.device("cpu")) == 1
        capsys.readouterr()

        from utils import cli

        def no_proc_stat():
            raise FileNotFoundError(cli.PROC_STAT)

        monkeypatch.setattr(cli, "_cpu_times", no_proc_stat)  # not Linux: the load average
        assert apply_threads(0, torch.device("cpu")) == 1
        monkeypatch.setattr(os, "getloadavg", lambda: (0.3, 0.0, 0.0))
        assert apply_threads(0, torch.device("cpu")) == len(cpus)
        assert capsys.readouterr().out.splitlines()[-1].endswith(f"(auto: {len(cpus)} cores, load average 0.3)")
        assert apply_threads(3, torch.device("cpu")) == 3 == torch.get_num_threads()
        assert capsys.readouterr().out == "using 3 torch threads (--threads 3)\n"
        torch.set_num_threads(2)
        assert apply_threads(0, torch.device("cuda")) == 2 == torch.get_num_threads()  # a GPU run: untouched
        assert capsys.readouterr().out == ""
        with pytest.raises(UserError, match="--threads"):
            apply_threads(-1, torch.device("cpu"))
    finally:
        torch.set_num_threads(before)


def test_threads_auto_on_this_machine_is_between_one_and_its_cores():
    """The real /proc/stat sample (where there is one) reads within 0..cores, and auto picks 1..cores."""
    from utils.cli import auto_threads, idle_cores
    cpus = sorted(os.sched_getaffinity(0))
    idle = idle_cores(cpus, interval=0.1)
    assert idle is None or -0.01 <= idle <= len(cpus) + 0.01
    n, why = auto_threads()
    assert 1 <= n <= len(cpus) and why.startswith("auto: ")


def test_trainer_applies_prints_and_logs_the_thread_count(tiny_pipeline, tmp_path, capsys):
    before = torch.get_num_threads()
    try:
        out = train_esd.main(esd_args(tiny_pipeline, tmp_path / "o", "--threads", "1", "--num_train_steps", "1"))
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    assert capsys.readouterr().out.count("using 1 torch thread (--threads 1)\n") == 1
    assert "device cpu, 1 torch threads" in (out / "train.log").read_text()


def test_help_shows_each_default_once_and_none_for_required_flags(capsys):
    with pytest.raises(SystemExit):
        train_sdd.parse_args(["--help"])
    text = capsys.readouterr().out

    def flag_help(flag: str) -> str:
        return " ".join(text.split(f"\n  {flag} ")[1].split("\n  --")[0].split())

    assert flag_help("--resolution").count("(default") == 1  # its help tells the default: not repeated
    assert "default" not in flag_help("--removing_concepts")  # required
    assert flag_help("--learning_rate").endswith("(default: 1e-05)")


@pytest.mark.parametrize("script", ["sdd", "esd"])
def test_optimizer_in_backward_gives_the_usual_step_and_refuses_what_needs_every_gradient(tiny_pipeline, tmp_path,
                                                                                        script):
    mod, make = (train_sdd, sd_args) if script == "sdd" else (train_esd, esd_args)
    flags = ("--learning_rate", "1e-3", "--max_grad_norm", "0", "--lr_scheduler", "linear")
    a = final_weights(mod.main(make(tiny_pipeline, tmp_path / "a", *flags)))
    b = final_weights(mod.main(make(tiny_pipeline, tmp_path / "b", *flags, "--optimizer_in_backward")))
    base = final_weights(tiny_pipeline)
    assert any(not torch.equal(a[k], base[k]) for k in a)  # it trained, and every tensor took the same steps
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    for extra, match in [((), "--max_grad_norm 0"), (("--max_grad_norm", "0", "--gradient_accumulation_steps", "2"),
                                                     "--gradient_accumulation_steps 1"),
                         (("--max_grad_norm", "0", "--mixed_precision", "fp16"), "fp16")]:
        with pytest.raises(UserError, match=match):
            mod.main(make(tiny_pipeline, tmp_path / "c", "--optimizer_in_backward", *extra))
        assert not (tmp_path / "c").exists()
