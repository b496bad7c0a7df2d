"""Smoke tests of the benchmarks on the tiny pipeline: the table, the reference layout's math, time-to-erase plumbing."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

import train_esd
import train_sdd
from benchmarks import bench_generate, time_to_erase
from benchmarks.reference_layout import ReferenceLayout

ROOT = Path(__file__).resolve().parents[1]




@pytest.mark.slow(minutes=0.3)  # bench_train.py end to end: a worker process per run
def test_bench_train_tiny_prints_a_table_with_ratios(tmp_path):
    out = subprocess.run([sys.executable, "benchmarks/bench_train.py", "--model", "tiny", "--model_dir",
                          str(tmp_path / "tiny"), "--resolution", "0", "--steps", "2", "--warmup", "0", "--methods",
                          "sdd", "--num_ddim_steps", "3", "--threads", "1", "--conv_autotune", "--json", str(tmp_path / "r.json")],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    row = next(ln for ln in out.stdout.splitlines() if ln.startswith("| sdd | fp32 |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert float(cells[2]) > 0 and float(cells[3]) > 0                      # s/step, ours and reference
    assert float(cells[4].strip("*")) == pytest.approx(float(cells[2]) / float(cells[3]), abs=0.01, rel=0.02)
    assert 0 < float(cells[7].strip("*")) <= 1.5                            # peak-memory ratio
    assert "text encoding" in out.stdout and "ours with --conv_autotune" in out.stdout
    saved = json.loads((tmp_path / "r.json").read_text())
    assert len(saved["rows"]) == 1 and len(saved["results"]) == 2 and saved["failed"] == []


@pytest.mark.slow(minutes=0.3)  # bench_train.py end to end: a worker process per run
def test_bench_train_goes_on_after_a_failed_run_and_keeps_what_finished(tmp_path):
    """A run that fails (here: a flag the trainer refuses) is listed, not fatal; only none finishing is an error."""
    out = subprocess.run([sys.executable, "benchmarks/bench_train.py", "--model", "tiny", "--model_dir",
                          str(tmp_path / "tiny"), "--resolution", "0", "--steps", "1", "--warmup", "0", "--methods",
                          "sdd", "--num_ddim_steps", "2", "--threads", "1", "--json", str(tmp_path / "r.json"),
                          "--extra", "--no_such_flag"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "error: every run failed" in out.stderr
    assert out.stdout.count(": failed: ") == 2  # both layouts were tried


@pytest.mark.parametrize("mod", [train_sdd, train_esd], ids=["sdd", "esd"])
def test_reference_layout_reproduces_our_trainer_step_by_step(tiny_pipeline, tmp_path, mod, one_thread):
    """Same seed, same k, z_T and t: the reference layout's losses equal the real trainer's, so both do the same work."""
    argv = ["--pretrained_model_name_or_path", str(tiny_pipeline), "--output_dir", str(tmp_path / "o"),
            "--removing_concepts", "nudity", "--num_train_steps", "3", "--num_ddim_steps", "5", "--learning_rate",
            "1e-2", "--device", "cpu", "--train_batch_size", "2", "--timestep_jitter"]
    mod.main(mod.parse_args(argv))
    log = (tmp_path / "o" / "train.log").read_text()
    ours = [(float(m.group(1)), int(m.group(2))) for m in re.finditer(r"step \d+ loss (\S+) .* k (\d+) ", log)]
    ref = ReferenceLayout(mod.parse_args(argv))
    theirs = [ref.step() for _ in range(3)]
    assert [k for _, k in ours] == [r["k"] for r in theirs]
    assert [loss for loss, _ in ours] == pytest.approx([r["loss"] for r in theirs], rel=1e-4)
    assert sum(p.numel() for p in ref.student.parameters() if p.requires_grad) == sum(p.numel() for p in ref.params)


@pytest.mark.slow(minutes=0.3)  # three training runs, each judged on 20-step toy images
def test_time_to_erase_plumbing_on_tiny(tiny_pipeline, tmp_path, capsys, one_thread):
    args = time_to_erase.parse_args(["--model", str(tiny_pipeline), "--runs", "reference", "ours-m2-b1", "ours-r3",
                                     "--max_steps", "2", "--check_every", "2", "--n_per_prompt", "1",
                                     "--final_n_per_prompt", "1", "--num_ddim_steps", "3", "--threads", "1",
                                     "--output_dir", str(tmp_path / "runs")])
    rows = time_to_erase.main(args)
    assert [r["name"] for r in rows] == ["reference", "ours-m2-b1", "ours-r3"]
    assert all(r["steps"] == 2 and r["seconds"] > 0 for r in rows)
    assert rows[1]["trajectory_samples"] == 2 and rows[1]["batch"] == 1 and rows[2]["trajectory_reuse"] == 3
    assert "| reference | 1 | 1 | 4 |" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        time_to_erase.parse_args(["--runs", "reference-m2"])


def test_empty_mix_ddim_row_is_the_quality_commands_empty_mix(tmp_path, one_thread):
    """Same seeds as `utils.toy quality`'s empty prompt; every sampler's mix sums to one; bad counts are refused."""
    from benchmarks import empty_mix
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


def test_png_overlap_reports_its_four_numbers(capsys):
    res = bench_generate.png_overlap(64, n=2)
    assert set(res) == {"png_ms", "encode_s", "work_s", "overlapped_s"} and all(v > 0 for v in res.values())
    assert "2 PNGs of 64 px" in capsys.readouterr().out


def test_sweep_reuses_a_finished_run_only_when_it_is_the_same_run(tiny_pipeline, tmp_path):
    from benchmarks import sweep_toy
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
    from benchmarks import sweep_toy

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

    from benchmarks.empty_mix import bounded_ddim
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
