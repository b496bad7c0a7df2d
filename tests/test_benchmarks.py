"""Smoke tests of the benchmarks on the tiny pipeline: the table, the reference layout's math, time-to-erase plumbing
(the one-off studies' tests are in experiments/tests, off the default run)."""
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
    out = subprocess.run([sys.executable, "-m", "benchmarks.bench_train", "--model", "tiny", "--model_dir",
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
    out = subprocess.run([sys.executable, "-m", "benchmarks.bench_train", "--model", "tiny", "--model_dir",
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


def test_png_overlap_reports_its_four_numbers(capsys):
    res = bench_generate.png_overlap(64, n=2)
    assert set(res) == {"png_ms", "encode_s", "work_s", "overlapped_s"} and all(v > 0 for v in res.values())
    assert "2 PNGs of 64 px" in capsys.readouterr().out