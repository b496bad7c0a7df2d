"""The toy table (utils/toy/table.py, run_toy_table.sh): its settings parse, its guards, and the --quick run on
the shipped toy model."""
from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pandas as pd
import pytest

import generate
from install_util import core_only_env
from utils.toy import table as T
from utils.cli import UserError

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "assets" / "toy-sd"


@pytest.mark.parametrize("name", list(T.METHODS))
def test_every_row_parses_with_the_script_it_runs(name):
    """A typo in METHODS fails here, not 20 minutes into a run."""
    for quick in (False, True):
        r = T.recipe(name, quick)
        if r["runner"] == "generate":
            generate.parse_args(["--prompt_path", "p.csv"] + T.argv_of(r["flags"]))
            continue
        args = T.TRAINERS[r["runner"]].parse_args(["--removing_concepts", *r["concepts"]] + T.argv_of(r["flags"]))
        assert args.method == r["runner"] and args.removing_concepts == r["concepts"]
        assert args.num_train_steps == r["flags"]["num_train_steps"]
        assert args.learning_rate == r["flags"]["learning_rate"]


def test_quick_scales_steps_and_the_ema_horizon_alike():
    full, quick = T.recipe("SDD", False)["flags"], T.recipe("SDD", True)["flags"]
    assert quick["num_train_steps"] == round(full["num_train_steps"] * T.QUICK_STEPS)
    horizon = lambda f: 1 / (1 - f["ema_decay"])  # steps
    assert horizon(quick) / quick["num_train_steps"] == pytest.approx(horizon(full) / full["num_train_steps"], rel=0.05)
    assert T.recipe("ESD-x-3 (red+blue)", False)["concepts"] == ["red", "blue"]
    assert T.recipe("SEGA", True) == {"runner": "generate", "concepts": ["red"], "flags": {"pipeline_type": "sega"}}
    assert T.slug("ESD-x-3 (red+blue)") == "esd-x-3-red-blue" and T.slug("SD+NEG") == "sd-neg"


def test_an_old_toy_model_is_refused_in_one_line(tmp_path):
    old = tmp_path / "old"
    (old / "tokenizer").mkdir(parents=True)
    from utils.tokenizer import write_clip_tokenizer

    write_clip_tokenizer(old / "tokenizer", ["a", "red", "circle"])
    (old / "model_index.json").write_text("{}")
    with pytest.raises(UserError, match="lacks words of the toy world 2 language"):
        T.check_model(old)
    with pytest.raises(UserError, match="not a diffusers pipeline folder"):
        T.check_model(tmp_path)


def test_the_script_wants_an_output_folder():
    out = subprocess.run(["bash", "run_toy_table.sh"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 2 and "usage: bash run_toy_table.sh OUT" in out.stderr


@pytest.mark.slow(minutes=4.5)
def test_quick_table_shape_sd_rate_and_resume(tmp_path, monkeypatch):
    T.check_model(MODEL)  # the shipped model speaks the toy world 2 language
    out = tmp_path / "table"
    cmd = ["bash", "run_toy_table.sh", str(out), "--quick", "--model", str(MODEL), "--device", "cpu"]
    env = {**core_only_env(), "TQDM_DISABLE": "1"}  # as after the README's install: requirements.txt alone
    first = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert first.returncode == 0, first.stderr[-3000:]
    for name in ("table.md", "table.csv", "table.png", "samples.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0
    table = pd.read_csv(out / "table.csv")
    assert list(table["method"]) == list(T.QUICK)
    assert [c for c in table.columns if c.endswith("%")][:3] == ["explicit red %", "paraphrase red %", "implied red %"]
    sd = table.set_index("method").loc["SD"]
    assert sd["explicit red %"] >= 90, sd
    tuned = table.set_index("method").loc[["ESD-x-3", "SDD"]]
    assert tuned["training s"].gt(0).all()
    # --quick's short erasures leave red in place and the attack finds it (both measured 100.0%)
    assert tuned["before attack red %"].ge(75).all() and tuned["after attack red %"].ge(75).all(), tuned
    assert table.set_index("method").loc[["SD", "SD+NEG", "SLD-max"], "after attack red %"].isna().all()
    assert "| SD |" in first.stdout and "| SDD (quick: 30 steps, plumbing only) |" in first.stdout  # printed
    assert "# Plumbing check (--quick)" in first.stdout and "not an erasure" in first.stdout  # and says what it is

    stamps = {p: p.stat().st_mtime for p in (out / "results").glob("*.json")}
    time.sleep(0.01)
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "== " not in again.stdout  # no method was run again
    assert {p: p.stat().st_mtime for p in (out / "results").glob("*.json")} == stamps
    assert pd.read_csv(out / "table.csv").equals(table)

    runner, flags = T.METHODS["SDD"]  # a changed recipe is refused in one line, naming the files to delete
    monkeypatch.setitem(T.METHODS, "SDD", (runner, {**flags, "num_train_steps": flags["num_train_steps"] + 10}))
    with pytest.raises(UserError, match=r"sdd.json was made with other settings .* to redo SDD"):
        T.main(T.parse_args([str(out), "--quick", "--model", str(MODEL), "--methods", "sdd"]))
