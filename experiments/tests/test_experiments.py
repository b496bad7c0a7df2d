"""The one-off studies still run: empty_mix, sweep_toy, lora_rank and target_drift on tiny settings."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from toy_util import TOY, esd_demo_run, needs_toy
from train_util import make_erasure


def test_empty_mix_ddim_row_is_the_quality_commands_empty_mix(tmp_path, one_thread):
    """Same seeds as `utils.toy quality`'s empty prompt; every sampler's mix sums to one; bad counts are refused."""
    from experiments import empty_mix
    from utils.toy import measure as M

    out = tmp_path / "mix.json"
    res = empty_mix.main(empty_mix.parse_args(["--n", "4", "--steps", "3", "--ddpm_steps", "3", "--samplers", "ddim",
                                               "ddpm", "--output", str(out)]))
    assert list(res) == ["ddim", "ddpm"] and all(sum(m.values()) == pytest.approx(1) for m in res.values())
    assert out.exists()
    items = M.empty_items(4, seed=0)
    quality = M.quality(items, M.draw(M.load_pipeline(empty_mix.ROOT / "assets" / "toy-sd"), items,
                                      num_inference_steps=3))
    assert quality["empty_mix"] == res["ddim"]
    with pytest.raises(SystemExit):
        empty_mix.parse_args(["--n", "0"])


def test_sweep_reuses_a_finished_run_only_when_it_is_the_same_run(tiny_pipeline, tmp_path):
    from experiments import sweep_toy
    from utils.cli import UserError

    def args(*flags):
        return sweep_toy.parse_args(["--model", str(tiny_pipeline), "--max_steps", "2", "--check_every", "2",
                                     "--output_dir", str(tmp_path), *flags, "--extra", "--num_ddim_steps", "2"])

    out = tmp_path / "lr1e-4"
    sweep_toy.train_one(args(), {"learning_rate": "1e-4"}, out)
    stamp = (out / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns
    sweep_toy.train_one(args(), {"learning_rate": "1e-4"}, out)  # the same run: kept as it is
    assert (out / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns == stamp
    with pytest.raises(UserError, match="finished run with other method"):
        sweep_toy.train_one(args("--method", "esd"), {"learning_rate": "1e-4"}, out)
    with pytest.raises(UserError, match="other removing_concepts"):
        sweep_toy.train_one(args("--removing_concepts", "blue"), {"learning_rate": "1e-4"}, out)


def test_sweep_measures_the_checkpoints_from_measure_from(tmp_path, one_thread):
    """--check_every 1 writes both checkpoints; --measure_from 2 measures only the second; a start past the run's
    end is refused."""
    from experiments import sweep_toy

    rows = sweep_toy.main(sweep_toy.parse_args([
        "--method", "esd", "--max_steps", "2", "--check_every", "1", "--measure_from", "2", "--n_per_prompt", "1",
        "--steps", "2", "--threads", "1", "--output_dir", str(tmp_path), "--extra", "--num_ddim_steps", "2"]))
    assert (tmp_path / "default" / "checkpoint-1").is_dir() and [r["step"] for r in rows] == [2]
    assert "| default | 2 |" in (tmp_path / "sweep.md").read_text()
    with pytest.raises(SystemExit):
        sweep_toy.parse_args(["--max_steps", "2", "--check_every", "1", "--measure_from", "3", "--output_dir", "x"])


def test_empty_mix_eta1_step_is_finite_at_zero_terminal_snr():
    """empty_mix's bounded DDIM at eta 1 is finite from t = T - 1 of a zero-SNR schedule (diffusers' stock step may
    give NaN there, depending on float rounding, so it is not asserted), and on SD's schedule it is the stock step."""
    import torch
    from diffusers import DDIMScheduler

    from experiments.empty_mix import bounded_ddim
    from utils.toy.train import make_scheduler

    x, v = torch.randn(4, 4, 4, generator=torch.Generator().manual_seed(0)), torch.ones(4, 4, 4)
    for zero_snr in (True, False):
        config = make_scheduler("v_prediction" if zero_snr else "epsilon", zero_snr).config
        outs = []
        for cls in (DDIMScheduler, bounded_ddim()):
            sched = cls.from_config(config)
            sched.set_timesteps(20)
            step = sched.step(v, sched.timesteps[0], x, eta=1.0, generator=torch.Generator().manual_seed(1))
            outs.append(step.prev_sample)
        assert torch.isfinite(outs[1]).all()
        if not zero_snr:
            assert torch.equal(outs[0], outs[1])



def test_rank_benchmark_table(tiny_pipeline, tmp_path):
    from experiments import lora_rank

    a = make_erasure(tiny_pipeline, tmp_path / "a" / "erasure.safetensors", seed=1)
    b = make_erasure(tiny_pipeline, tmp_path / "b" / "erasure.safetensors", seed=2)
    rows = lora_rank.main(lora_rank.parse_args([
        "--model", str(tiny_pipeline), "--erasures", f"x={a}", "--ranks", "1", "--combine", str(a), str(b),
        "--combine_ranks", "full", "--n_per_prompt", "1", "--steps", "2", "--output_dir", str(tmp_path / "bench")]))
    weights = ["base model", "full U-Net", "full, LoRA layers only"]
    assert [(r["model"], r["weights"]) for r in rows] == [*[("x", w) for w in weights], ("x", "LoRA r=1"),
                                                          *[("a+b", w) for w in weights], ("a+b", "LoRA r=full")]
    assert rows[3]["kept"] < rows[7]["kept"] <= 1 and rows[3]["size_kib"] < rows[1]["size_kib"]
    assert set(rows[0]["colour_rate"]) == {"red explicit", "red paraphrase", "red implied", "neighbour kept",
                                           "others kept"}  # the erased colour, read from the files' concepts
    table = (tmp_path / "bench" / "table.md").read_text()
    assert "| x | LoRA r=1 | 1 |" in table and "| a+b | LoRA r=full | 16-32 + 16-32 |" in table
    assert json.loads((tmp_path / "bench" / "results.json").read_text())["rows"][6]["model"] == "a+b"
    assert len(list((tmp_path / "bench").glob("*.safetensors"))) == 3


@pytest.fixture(scope="module")
def esd_run(tmp_path_factory, one_thread) -> Path:
    """run_esd_toy.sh's training (150 steps), with a checkpoint at step 75 and at the end."""
    return esd_demo_run(tmp_path_factory.mktemp("esd") / "esd")


@needs_toy
def test_target_drift_on_the_esd_run_and_its_checkpoints(esd_run, tmp_path, one_thread):
    """The base U-Net against itself moves nothing; ESD moves red's estimate more than the empty prompt's and the
    other colours'; --with_checkpoints puts the run's earlier checkpoint first; the checkpoint at the last step is
    the saved U-Net; a timestep out of range is refused."""
    from experiments import target_drift
    from utils.cli import UserError

    assert sorted(p.name for p in esd_run.glob("checkpoint-*")) == ["checkpoint-150", "checkpoint-75"]
    small = ["--num_images", "1", "--num_inference_steps", "4", "--threads", "1"]
    flags = [*small, "--timesteps", "300", "700"]
    units = [str(TOY / "unet"), str(esd_run / "checkpoint-150"), str(esd_run / "unet")]
    res = target_drift.main(target_drift.parse_args(["--unet", *units, "--with_checkpoints", "--output",
                                                     str(tmp_path / "d.json"), *flags]))
    assert list(res) == [*units[:2], str(esd_run / "checkpoint-75"), units[2]]  # the run's checkpoints before it
    same, step150, step75, final = res.values()
    assert same["uncond"] == same["concept"] == same["kept"] == 0 and same["gap"] == pytest.approx(1)
    assert step150 == pytest.approx(final, abs=1e-6)
    assert final["concept"] > 2 * max(final["uncond"], final["kept"])
    assert 0 < step75["concept"] != final["concept"]
    assert 0 < json.loads((tmp_path / "d.json").read_text())["shared_positions"] < 16
    with pytest.raises(UserError, match="--unet .*nope does not exist"):
        target_drift.main(target_drift.parse_args(["--unet", str(tmp_path / "nope"), *flags]))
    with pytest.raises(UserError, match="outside 0..999"):
        target_drift.main(target_drift.parse_args(["--unet", units[0], *small, "--timesteps", "1000"]))



def test_uncond_table_trains_measures_and_resumes(shipped_toy, tmp_path, one_thread):
    """Each (row, seed) trains once and is measured once; a rerun keeps both; the empty mix's move is a distance."""
    from experiments import uncond_table

    def table(*seeds):
        return uncond_table.main(uncond_table.parse_args([
            "--model", str(shipped_toy), "--output_dir", str(tmp_path), "--rows", "SDD demo, target original",
            "--seeds", *seeds, "--steps_scale", "0.005", "--n_per_prompt", "1", "--n_empty", "2", "--threads", "1"]))

    rows = table("0")
    unet = tmp_path / "sdd-demo-target-original" / "seed-0" / "unet" / "diffusion_pytorch_model.safetensors"
    stamp = unet.stat().st_mtime_ns
    assert (tmp_path / "table.md").is_file() and rows[0]["seeds"] == 1
    saved = json.loads((tmp_path / "table.json").read_text())
    assert saved["flags"]["SDD demo, target original"][1]["uncond_from"] == "original"
    assert 0 <= saved["raw"]["SDD demo, target original"][0]["empty_moved"] <= 1
    rows = table("0", "1")  # seed 0 is kept as it was, seed 1 is added
    assert unet.stat().st_mtime_ns == stamp and rows[0]["seeds"] == 2 and "(" in rows[0]["shapes"]
