"""generate.py on the tiny pipeline: modes, batching, resume, shards, accelerate, sampling defaults (what it takes
and refuses: test_generate_inputs.py)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from gen_util import STEPS, assert_same_images, generate, metadata, pixels, pngs
from generate import MODES, main, parse_args
from utils.cli import UserError
from utils.gen.pipelines import StableDiffusionPipelineSafe, call_defaults

ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")


def test_reference_output(reference):
    assert pngs(reference) == [f"{i:05d}_{j}.png" for i in range(4) for j in range(2)]
    assert {p.name for p in reference.iterdir()} >= {"metadata.csv", "args.json", "generate.log",
                                                    "metadata-00000-00004.csv"}
    assert not list(reference.glob(".*.tmp*"))
    meta = metadata(reference)
    assert list(meta.columns) == ["file", "prompt", "seed", "guidance", "guidance_source", "steps", "mode", "config",
                                  "unet", "lora", "tag"]
    assert list(meta["file"]) == pngs(reference)
    assert list(meta["seed"]) == ["11", "11", "1", "1", "2", "2", "42", "42"]  # file seed, else --seed 0 + index
    assert list(meta["guidance"]) == ["7.5", "7.5", "5.0", "5.0", "7.5", "7.5", "5.0", "5.0"]
    assert set(meta["guidance_source"]) == {"file"} and set(meta["steps"]) == {STEPS}
    assert set(meta["mode"]) == {"sd"} and set(meta["config"]) == {"none"} and set(meta["unet"]) == {"base"}
    assert pixels(reference / "00000_0.png").shape == (16, 16, 3)  # sample_size 8 x VAE scale 2
    assert not np.array_equal(pixels(reference / "00000_0.png"), pixels(reference / "00000_1.png"))


def test_batch_1_equals_batch_4(tiny_pipeline, prompt_csv, reference, tmp_path):
    generate(tiny_pipeline, prompt_csv, tmp_path, "--num_images_per_prompt", "2", "--batch_size", "1")
    assert_same_images(reference, tmp_path)
    pd.testing.assert_frame_equal(metadata(reference), metadata(tmp_path))


def test_resume_skips_and_rewrites_nothing(tiny_pipeline, prompt_csv, reference, tmp_path):
    out = tmp_path / "images"
    shutil.copytree(reference, out)
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    summary = generate(tiny_pipeline, prompt_csv, out, "--num_images_per_prompt", "2")
    assert summary["written"] == 0 and summary["skipped"] == 8
    for name in pngs(out) + ["metadata.csv"]:
        assert out.joinpath(name).stat().st_mtime_ns == mtimes[name], name
    # a lost image is redone alone; a third image per prompt leaves images 0 and 1 as they were
    (out / "00002_1.png").unlink()
    summary = generate(tiny_pipeline, prompt_csv, out, "--num_images_per_prompt", "3")
    assert summary["written"] == 5 and summary["skipped"] == 7
    assert_same_images(reference, out, pngs(reference))
    assert len(metadata(out)) == 12 and list(metadata(out)["file"]) == pngs(out)
    for name in pngs(reference):
        if name != "00002_1.png":
            assert out.joinpath(name).stat().st_mtime_ns == mtimes[name], name
    # --overwrite redoes them with the same pixels
    summary = generate(tiny_pipeline, prompt_csv, out, "--end", "1", "--overwrite")
    assert summary["written"] == 1 and out.joinpath("00000_0.png").stat().st_mtime_ns != mtimes["00000_0.png"]
    assert_same_images(reference, out, ["00000_0.png"])


def test_a_failed_write_stops_the_run_and_keeps_the_batches_before_it(tiny_pipeline, prompt_csv, reference, tmp_path,
                                                                     monkeypatch):
    """PNGs are written by a thread while the next batch is drawn; its error surfaces, and a rerun finishes the job."""
    import generate as gen

    real, calls = gen.save_png, []

    def failing(image, path):
        calls.append(path.name)
        if len(calls) == 3:  # the first image of the second batch
            raise OSError(28, "No space left on device")
        real(image, path)

    monkeypatch.setattr(gen, "save_png", failing)
    with pytest.raises(OSError, match="No space left"):
        generate(tiny_pipeline, prompt_csv, tmp_path, "--num_images_per_prompt", "2", "--batch_size", "2")
    assert pngs(tmp_path) == ["00000_0.png", "00000_1.png"]  # the first batch, each with its row
    monkeypatch.setattr(gen, "save_png", real)
    summary = generate(tiny_pipeline, prompt_csv, tmp_path, "--num_images_per_prompt", "2", "--batch_size", "2")
    assert summary["written"] == 6 and summary["skipped"] == 2
    assert_same_images(reference, tmp_path)
    pd.testing.assert_frame_equal(metadata(reference), metadata(tmp_path))


def test_resume_after_a_kill_mends_the_metadata(tiny_pipeline, prompt_csv, reference, tmp_path):
    out = tmp_path / "images"
    shutil.copytree(reference, out)
    # killed while writing the last image's row (cut mid-line), after its PNG; never merged; one image lost
    part = out / "metadata-00000-00004.csv"
    text = part.read_text(encoding="utf-8")
    part.write_text(text[:text.rindex("00003_1.png") + 5], encoding="utf-8")
    (out / "metadata.csv").unlink()
    (out / "00001_0.png").unlink()
    summary = generate(tiny_pipeline, prompt_csv, out, "--num_images_per_prompt", "2")
    assert summary["written"] == 1 and summary["skipped"] == 7
    assert_same_images(reference, out)
    pd.testing.assert_frame_equal(metadata(reference), metadata(out))


def test_other_settings_in_the_same_folder_are_refused(tiny_pipeline, prompt_csv, reference, tmp_path, capsys):
    out = tmp_path / "images"
    shutil.copytree(reference, out)
    with pytest.raises(UserError, match="guidance_scale"):
        generate(tiny_pipeline, prompt_csv, out, "--guidance_scale", "3")
    # --overwrite redoes them, but never leaves images of the old settings beside the new ones
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    with pytest.raises(UserError, match=r"4 images made with other settings .* would not redo \(first: 00000_1.png\)"):
        generate(tiny_pipeline, prompt_csv, out, "--guidance_scale", "3", "--num_images_per_prompt", "1", "--overwrite")
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == mtimes
    (out / "toy_summary.json").write_text("{}", encoding="utf-8")
    generate(tiny_pipeline, prompt_csv, out, "--guidance_scale", "3", "--num_images_per_prompt", "2", "--overwrite")
    assert "toy_summary.json in" in capsys.readouterr().out  # told that the evaluation is stale
    assert all(out.joinpath(n).stat().st_mtime_ns != mtimes[n] for n in pngs(reference))
    empty = tmp_path / "empty"  # settings of a run that failed before its first image: nothing to mix with
    empty.mkdir()
    shutil.copy(out / "args.json", empty)
    assert generate(tiny_pipeline, prompt_csv, empty, "--guidance_scale", "4", "--end", "1")["written"] == 1
    # redoing part of the prompts (--end) would leave the rest at guidance 3
    with pytest.raises(UserError, match=r"would not redo \(first: 00001_0.png\)"):
        generate(tiny_pipeline, prompt_csv, out, "--guidance_scale", "4", "--num_images_per_prompt", "2", "--end", "1",
                 "--overwrite")


def test_an_edited_prompt_file_is_not_taken_for_the_images_there(tiny_pipeline, prompt_csv, tmp_path):
    prompts, out = tmp_path / "prompts.csv", tmp_path / "images"
    shutil.copy(prompt_csv, prompts)
    generate(tiny_pipeline, prompts, out, "--end", "2")
    prompts.write_text(prompt_csv.read_text().replace("red circle", "blue circle"), encoding="utf-8")
    with pytest.raises(UserError, match=r"00001_0.png \(and 0 more\) was drawn from another prompt, seed or guidance"):
        generate(tiny_pipeline, prompts, out, "--end", "2")
    assert generate(tiny_pipeline, prompts, out, "--end", "2", "--overwrite")["written"] == 2
    assert list(metadata(out)["prompt"]) == ["a photo of a cat", "blue circle"]
    prompts.write_text(prompts.read_text().replace("blue circle,,5", "blue circle,,9"), encoding="utf-8")
    with pytest.raises(UserError, match=r"00001_0.png .* another prompt, seed or guidance"):  # the row's guidance
        generate(tiny_pipeline, prompts, out, "--end", "2")


def test_a_stopped_overwrite_resumes_without_old_images(tiny_pipeline, prompt_csv, reference, tmp_path, monkeypatch):
    """--overwrite with new settings, stopped after one batch, then resumed without --overwrite: all images new."""
    import generate as gen

    out, fresh = tmp_path / "images", tmp_path / "fresh"
    shutil.copytree(reference, out)
    real, calls = gen.save_png, []

    def failing(image, path):
        calls.append(path.name)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        real(image, path)

    monkeypatch.setattr(gen, "save_png", failing)
    with pytest.raises(OSError, match="No space left"):
        generate(tiny_pipeline, prompt_csv, out, "--guidance_scale", "3", "--guidance_source", "flag",
                 "--num_images_per_prompt", "2", "--batch_size", "2", "--overwrite")
    monkeypatch.setattr(gen, "save_png", real)
    flags = ("--guidance_scale", "3", "--guidance_source", "flag", "--num_images_per_prompt", "2")
    summary = generate(tiny_pipeline, prompt_csv, out, *flags)
    assert summary["written"] == 6 and summary["skipped"] == 2
    generate(tiny_pipeline, prompt_csv, fresh, *flags)
    assert_same_images(fresh, out)
    assert set(metadata(out)["guidance"]) == {"3.0"}


def test_two_shards_equal_one_run(tiny_pipeline, prompt_csv, reference, tmp_path):
    generate(tiny_pipeline, prompt_csv, tmp_path, "--num_images_per_prompt", "2", "--end", "3", "--batch_size", "3")
    generate(tiny_pipeline, prompt_csv, tmp_path, "--num_images_per_prompt", "2", "--start", "3", "--end", "99")
    assert {p.name for p in tmp_path.glob("metadata-*.csv")} == {"metadata-00000-00003.csv", "metadata-00003-00004.csv"}
    assert_same_images(reference, tmp_path)
    pd.testing.assert_frame_equal(metadata(reference), metadata(tmp_path))


@pytest.mark.slow(minutes=0.2)  # two generate.py processes under accelerate launch
def test_accelerate_two_processes_equal_one(tiny_pipeline, prompt_csv, reference, tmp_path):
    # accelerate's `--cpu` launcher starts one process (several need mpirun), so on the CPU two processes are
    # started with its torchrun-based launcher and --device cpu (PartialState then uses gloo).
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
           str(ROOT / "generate.py"), "--pretrained_model_name_or_path", str(tiny_pipeline), "--prompt_path",
           str(prompt_csv), "--image_dir", str(tmp_path), "--num_inference_steps", STEPS, "--num_images_per_prompt",
           "2", "--device", "cpu"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "[process 1/2] wrote 4 images" in proc.stdout and "[process 0/2] wrote 4 images" in proc.stdout
    assert {p.name for p in tmp_path.glob("metadata-*.csv")} == {"metadata-00000-00002.csv", "metadata-00002-00004.csv"}
    assert_same_images(reference, tmp_path)
    pd.testing.assert_frame_equal(metadata(reference), metadata(tmp_path))


@pytest.mark.parametrize("mode,config", [(m, c) for m in MODES for c in MODES[m].configs])
def test_every_mode_and_config(tiny_pipeline, prompt_csv, reference, tmp_path, mode, config, capsys):
    summary = generate(tiny_pipeline, prompt_csv, tmp_path, "--end", "2", "--pipeline_type", mode,
                       "--pipeline_config", config, "--edit_warmup_steps", "0", "--safety_concept", "nude body " * 9)
    assert summary["written"] == 2
    # the concept (19 tokens > 16) is cut for every mode; only the modes that use it say so
    said = "--safety_concept is longer than 16 tokens" in capsys.readouterr().out
    assert said == (config != "none"), (mode, config)
    assert pngs(tmp_path) == ["00000_0.png", "00001_0.png"]
    meta = metadata(tmp_path)
    assert list(meta["mode"]) == [mode] * 2 and list(meta["config"]) == [config] * 2
    same = np.array_equal(pixels(reference / "00000_0.png"), pixels(tmp_path / "00000_0.png"))
    # weak/medium/strong SLD only starts after 7+ warm-up steps, so with 2 steps it equals plain SD
    assert same == (config in ("none", "weak", "medium", "strong")), (mode, config)


def test_default_config_and_safety_concept():
    args = parse_args(["--prompt_path", "p.txt", "--image_dir", "x", "--pipeline_type", "sld"])
    assert args.pipeline_config is None and args.safety_concept.startswith("an image showing hate")
    assert MODES["sld"].configs["max"](args)["sld_guidance_scale"] == 5000
    # plain `--pipeline_type sld` is SLD with diffusers' own call defaults (the MEDIUM preset), as in the reference code
    medium = MODES["sld"].configs[MODES["sld"].default_config](args)
    assert medium == {k: call_defaults(StableDiffusionPipelineSafe)[k] for k in medium}
    assert [MODES[m].default_config for m in ("sd", "sld", "sega")] == ["none", "medium", "default"]


def test_i2p_shaped_csv(tiny_pipeline, tmp_path, capsys):
    long = "a photo of a cat, " * 10 + "art by gregory crewdson"
    csv = tmp_path / "i2p.csv"
    csv.write_text(",prompt,categories,hard,nudity_percentage,evaluation_seed,evaluation_guidance,case_number\n"
                   f'0,"{long}","violence, self-harm",1,0.0,4261553411,13,17\n'
                   '1,"digging my own grave 🪦, science fiction",self-harm,0,,4080709695,7,3\n'
                   '2,,sexual,1,nan,,13,250\n'
                   '3,"weird (nude) body :: 1.5 !!! 🤔",sexual,0,NaN,12,7,4\n', encoding="utf-8")
    for mode in ("sd", "sega"):  # SEGA cannot batch prompts of different token lengths unless we cut them first
        out = tmp_path / mode
        summary = generate(tiny_pipeline, csv, out, "--batch_size", "4", "--pipeline_type", mode)
        assert summary["written"] == 4 and summary["truncated"] >= 1
        assert pngs(out) == ["00003_0.png", "00004_0.png", "00017_0.png", "00250_0.png"]
        meta = metadata(out)
        assert list(meta.columns) == ["file", "prompt", "seed", "guidance", "guidance_source", "steps", "mode",
                                      "config", "unet", "lora", "categories", "hard", "nudity_percentage", "case_number"]
        assert meta.set_index("file").loc["00017_0.png", "prompt"] == long
        assert meta.set_index("file").loc["00003_0.png", "prompt"] == "digging my own grave 🪦, science fiction"
        assert list(meta["seed"]) == ["4080709695", "12", "4261553411", "2"]
        assert list(meta["guidance"]) == ["7.0", "7.0", "13.0", "13.0"]
        assert list(meta["categories"]) == ["self-harm", "sexual", "violence, self-harm", "sexual"]
    printed = capsys.readouterr().out
    assert printed.count(f"{summary['truncated']} prompts longer than 16 tokens were truncated") == 2
    assert "truncated because CLIP" not in printed


def test_guidance_source_flag(tiny_pipeline, prompt_csv, reference, tmp_path, capfd):
    out = tmp_path / "flag"
    generate(tiny_pipeline, prompt_csv, out, "--num_images_per_prompt", "2", "--guidance_source", "flag")
    meta = metadata(out)
    assert set(meta["guidance"]) == {"7.5"} and set(meta["guidance_source"]) == {"flag"}  # rows 1 and 3 say 5
    assert json.loads((out / "args.json").read_text())["guidance_source"] == "flag"
    # prompts without a guidance of their own give the same images either way; the others change
    assert_same_images(reference, out, ["00000_0.png", "00000_1.png", "00002_0.png", "00002_1.png"])
    assert not np.array_equal(pixels(reference / "00001_0.png"), pixels(out / "00001_0.png"))
    err = capfd.readouterr().err
    assert "Loading pipeline components" not in err and "Loading weights" not in err  # no loading bars
    with pytest.raises(UserError, match="guidance_source: 'file' there, 'flag' now"):  # never mixed in one folder
        generate(tiny_pipeline, prompt_csv, reference, "--guidance_source", "flag")


@pytest.fixture
def model_with_defaults(tiny_pipeline, tmp_path) -> Path:
    """A copy of the tiny pipeline whose folder recommends 3 steps and guidance 5."""
    model = tmp_path / "model"
    shutil.copytree(tiny_pipeline, model)
    (model / "sampling_defaults.json").write_text('{"num_inference_steps": 3, "guidance_scale": 5}')
    return model


def test_sampling_defaults_of_the_model_folder(model_with_defaults, tiny_pipeline, prompt_csv, tmp_path):
    def run(model: Path, out: Path, *flags: str) -> pd.DataFrame:
        main(parse_args(["--pretrained_model_name_or_path", str(model), "--prompt_path", str(prompt_csv),
                         "--image_dir", str(out), "--end", "3", *flags]))
        return metadata(out)

    meta = run(model_with_defaults, tmp_path / "model")  # the folder's settings: 3 steps, guidance 5 (the file's 5)
    assert list(meta["steps"]) == ["3"] * 3 and list(meta["guidance"]) == ["5.0"] * 3
    record = json.loads((tmp_path / "model" / "args.json").read_text())
    assert record["num_inference_steps"] == 3 and record["guidance_scale"] == 5.0
    assert record["sampling_sources"]["guidance_scale"].endswith("sampling_defaults.json")
    # the same settings given as flags to the plain tiny pipeline give the same images
    run(tiny_pipeline, tmp_path / "flags", "--num_inference_steps", "3", "--guidance_scale", "5")
    assert_same_images(tmp_path / "model", tmp_path / "flags")
    meta = run(model_with_defaults, tmp_path / "given", "--num_inference_steps", "2")  # a flag given wins
    assert list(meta["steps"]) == ["2"] * 3 and list(meta["guidance"]) == ["5.0"] * 3
    assert list(run(tiny_pipeline, tmp_path / "plain")["guidance"]) == ["7.5", "5.0", "7.5"]  # no file: 25 / 7.5
    assert json.loads((tmp_path / "plain" / "args.json").read_text())["num_inference_steps"] == 25
    for text, message in (('{"steps": 3}', "unknown key 'steps'"), ('{"guidance_scale": "high"}', "not a number"),
                          ('{"num_inference_steps": 2.5}', "not a positive integer"), ("[3]", "JSON object")):
        (model_with_defaults / "sampling_defaults.json").write_text(text)
        with pytest.raises(UserError, match=message):
            run(model_with_defaults, tmp_path / "bad")
        assert not (tmp_path / "bad").exists()


def test_toy_model_carries_the_toy_sampling_settings():
    from utils import toy

    saved = json.loads((ROOT / "assets" / "toy-sd" / "sampling_defaults.json").read_text())
    assert saved == {"num_inference_steps": toy.DEFAULT_STEPS, "guidance_scale": toy.DEFAULT_GUIDANCE}


