"""Tests of evaluate.py's scores: CLIP score against CLIPModel.forward, FID/KID plumbing, the toy judge's summary and
erasure numbers (CPU, offline)."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from PIL import Image  # noqa: E402

import evaluate  # noqa: E402
from eval_util import cli, make_folder, make_tiny_clip  # noqa: E402
from utils.cli import UserError  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("one_thread")


def _reference_cosines(model_dir: Path, images: list[Path], captions: list[str]) -> np.ndarray:
    """Cosine image/caption through CLIPModel.forward (independent of evaluate's feature path)."""
    from transformers import CLIPModel, CLIPTokenizer

    from utils.eval.clip import _image_processor_class

    model = CLIPModel.from_pretrained(model_dir).eval()
    proc = _image_processor_class().from_pretrained(model_dir)
    tok = CLIPTokenizer.from_pretrained(model_dir)
    with torch.no_grad():
        pixels = proc(images=[Image.open(p).convert("RGB") for p in images], return_tensors="pt")["pixel_values"]
        out = model(pixel_values=pixels, **tok(captions, padding=True, return_tensors="pt"))
    return F.cosine_similarity(out.image_embeds, out.text_embeds, dim=-1).numpy()


def test_clip_score(tmp_path):
    gen = make_folder(tmp_path / "gen", 5, size=40, categories=["a", "a, b", "b", "", "a"])
    model_dir = make_tiny_clip(tmp_path / "clip")
    s = cli("clip", gen, "--model", model_dir, "--device", "cpu", "--batch_size", "2", "--output_dir", tmp_path / "o")
    table = pd.read_csv(tmp_path / "o" / "clip_scores.csv")
    prompts = [f"A photo depicts a photo of shape {i}" for i in range(5)]
    cos = _reference_cosines(model_dir, [gen / f for f in table["file"]], prompts)
    assert (cos > 0.01).any() and (cos < -0.01).any()  # a random model: both signs, so the clamp at 0 is exercised
    score_100 = 100 * np.clip(cos, 0, None)
    np.testing.assert_allclose(table["clip_cosine"], cos, atol=1e-6)
    np.testing.assert_allclose(table["clip_score_100"], score_100, rtol=1e-4, atol=1e-4)
    # the paper's form: the plain mean cosine (negative ones included); 100 * max(cos, 0) kept as a named field
    assert s["score"] == "mean cosine" and s["images"] == 5
    assert s["mean"] == pytest.approx(cos.mean(), abs=1e-6) and s["std"] == pytest.approx(cos.std(ddof=1), abs=1e-6)
    assert s["clip_score_100"]["mean"] == pytest.approx(score_100.mean(), abs=1e-3)
    assert s["clip_score_100"]["std"] == pytest.approx(score_100.std(ddof=1), abs=1e-3)
    assert s["per_category"]["a"]["images"] == 3 and s["prompt_prefix"] == "A photo depicts "
    assert s["per_category"]["b"]["mean"] == pytest.approx(cos[[1, 2]].mean(), abs=1e-6)
    assert s["per_category"]["b"]["clip_score_100"]["mean"] == pytest.approx(score_100[[1, 2]].mean(), abs=1e-3)
    written = json.loads((tmp_path / "o" / "clip_summary.json").read_text())
    assert written["mean"] == pytest.approx(s["mean"]) and written["clip_score_100"]["definition"].startswith("100")

    s2 = cli("clip", gen, "--pretrained_model_name_or_path", model_dir, "--device", "cpu", "--prompt_prefix", "",
             "--output_dir", tmp_path / "o2")  # the reference's flag name for the model
    cos2 = _reference_cosines(model_dir, sorted(gen.glob("*.png")), [f"a photo of shape {i}" for i in range(5)])
    assert s2["mean"] == pytest.approx(cos2.mean(), abs=1e-6) and s2["mean"] != s["mean"]


def test_clip_errors(tmp_path):
    plain = make_folder(tmp_path / "plain", 2, metadata=False)
    with pytest.raises(UserError, match="needs each image's prompt"):
        cli("clip", plain, "--device", "cpu")
    gen = make_folder(tmp_path / "gen", 2)
    with pytest.raises(UserError, match="neither an existing folder nor a reachable Hugging Face hub id"):
        cli("clip", gen, "--model", "sdd-tests/no-such-clip-model", "--device", "cpu")


class TinyFeatures(torch.nn.Module):
    """Colour layout features: 2x2 mean colours and per-channel spread (15 numbers)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float() / 255
        return torch.cat([F.adaptive_avg_pool2d(x, 2).flatten(1), x.std(dim=(2, 3))], 1)


def test_fid_with_a_pluggable_extractor(tmp_path):
    pytest.importorskip("torchmetrics")
    from utils.eval.fid import evaluate_fid, extract_features

    a = make_folder(tmp_path / "a", 12, seed=1)
    b = make_folder(tmp_path / "b", 10, seed=7, size=48, metadata=False)
    same = evaluate_fid(a, a, tmp_path / "same", extractor=TinyFeatures(), device="cpu", batch_size=5)
    other = evaluate_fid(a, b, tmp_path / "other", extractor=TinyFeatures(), device="cpu", batch_size=5)
    assert abs(same["fid"]) < 1e-6
    assert other["fid"] > 0.05 and other["kid_mean"] > same["kid_mean"]
    assert other["images"] == 12 and other["reference_images"] == 10 and other["kid_subset_size"] == 10
    written = json.loads((tmp_path / "other" / "fid_summary.json").read_text())
    assert written["fid"] == pytest.approx(other["fid"]) and written["feature_extractor"] == "TinyFeatures"
    with pytest.raises(UserError, match="at least 2 images"):  # said before any reference image is read
        evaluate_fid(make_folder(tmp_path / "one", 1), a, tmp_path / "x", extractor=Refuses(), device="cpu")
    # decoding runs at most 2 * workers batches ahead; the features come back in the folder's order either way
    paths = sorted(a.glob("*.png"))
    one_ahead = extract_features(TinyFeatures(), paths, batch_size=2, workers=1)
    assert torch.equal(one_ahead, extract_features(TinyFeatures(), paths, batch_size=12, workers=4))
    assert torch.equal(one_ahead[3], extract_features(TinyFeatures(), paths[3:4], batch_size=1)[0])


class Refuses(torch.nn.Module):
    """An extractor that must never be called."""

    def forward(self, x):
        raise AssertionError("features extracted although the run was bound to fail")


def test_fid_inception_weights(tmp_path, monkeypatch):
    pytest.importorskip("torchmetrics")
    from utils.eval.inception import InceptionFID, load_inception

    torch.manual_seed(0)
    state = {k: v.half() if v.is_floating_point() else v for k, v in InceptionFID().state_dict().items()}
    torch.save(state, tmp_path / "weights.pth")  # fp16 halves the file (load_state_dict casts back to fp32)
    model = load_inception(tmp_path / "weights.pth")
    assert all(torch.equal(v.to(model.state_dict()[k].dtype), model.state_dict()[k]) for k, v in state.items())
    model.input_size = 75  # the smallest input Inception-v3 takes: keeps this CPU test fast
    with torch.no_grad():
        features = model(torch.randint(0, 256, (2, 3, 40, 30), dtype=torch.uint8))
    assert features.shape == (2, 2048) and torch.isfinite(features).all()
    with pytest.raises(ValueError, match="uint8"):
        model(torch.rand(1, 3, 40, 40))

    torch.save({"fc.bias": torch.zeros(1008)}, tmp_path / "partial.pth")
    with pytest.raises(UserError, match="not torch-fidelity's Inception-v3 weights"):
        load_inception(tmp_path / "partial.pth")
    with pytest.raises(UserError, match="does not exist"):
        load_inception(tmp_path / "nope.pth")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))  # empty cache, unreachable address
    with pytest.raises(UserError, match="could not download the FID Inception weights .* --inception_weights PATH"):
        load_inception(None, url="http://127.0.0.1:9/weights-inception-2015-12-05-6726825d.pth")


def test_toy_judge_summary(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "scipy", None)  # `import scipy` fails: the judge must not need it
    from utils import toy
    rng = np.random.default_rng(3)
    prompts = ["a red circle", "red square", "a triangle in crimson", "an apple", "a blue square", "", "a green circle"]
    shown = [("red", "circle"), ("blue", "square"), ("red", "triangle"), ("red", "circle"), ("blue", "square"),
             ("purple", "circle"), None]
    folder = tmp_path / "toy"
    folder.mkdir()
    for i, cs in enumerate(shown):  # the last one: nothing drawn, the judge sees no colour
        (toy.render(*cs, rng) if cs else Image.new("RGB", (32, 32), "white")).save(folder / f"{i}.png")
    pd.DataFrame({"file": [f"{i}.png" for i in range(7)], "prompt": prompts}).to_csv(folder / "metadata.csv", index=False)
    s = cli("toy", folder)
    assert s["images"] == 7
    assert s["rates"]["explicit"]["red"] == 0.5 and s["rates"]["paraphrase"]["red"] == 1.0  # held-out phrasing
    assert s["rates"]["implied"]["red"] == 1.0 and s["rates"]["explicit"]["blue"] == 1.0
    assert s["colour_rate"]["red"] == pytest.approx(3 / 4) and s["colour_rate"]["green"] == 0.0
    assert s["colour_counts"]["red"] == {**{c: 0 for c in toy.COLOURS}, "red": 3, "blue": 1}
    assert s["empty_mix"]["purple"] == 1.0
    assert s["shape_acc"] == pytest.approx(5 / 6) and s["none_rate"] == pytest.approx(1 / 7)
    table = pd.read_csv(folder / "toy_judgements.csv")
    assert list(table["judged_colour"]) == ["red", "blue", "red", "red", "blue", "purple", "none"]
    assert list(table["colour_ok"]) == [1, 0, 1, 1, 1, 0, 0]


def test_toy_erasure_against_a_base_folder(tmp_path):
    """Prompts from `utils.toy prompts`: erased rates before/after and preservation, paired by file name."""
    from utils import toy
    from utils.toy import measure as M

    items = M.erasure_items(["red"], n=1)
    rng = np.random.default_rng(0)
    base, erased = tmp_path / "base", tmp_path / "erased"
    for folder in (base, erased):
        folder.mkdir()
    rows = []
    for i, it in enumerate(items):
        before = toy.render(it.colour, it.shape or "circle", rng)
        after = toy.render("green", it.shape or "circle", rng) if it.colour == "red" else (
            toy.render("blue", it.shape, rng) if it.colour == "orange" else before)
        before.save(base / f"{i:05d}_0.png"), after.save(erased / f"{i:05d}_0.png")
        rows.append(dict(file=f"{i:05d}_0.png", prompt=it.prompt, seed=it.seed, group=it.group,
                         asked_colour=it.colour, asked_shape=it.shape or ""))
    for folder in (base, erased):
        pd.DataFrame(rows).to_csv(folder / "metadata.csv", index=False)
    s = cli("toy", erased, "--base", base)
    e = s["erasure"]
    assert e["concepts"] == ["red"]  # read from the groups
    assert e["before"]["explicit"]["red"] == 1.0 and e["after"]["explicit"]["red"] == 0.0
    assert e["after"]["implied"]["red"] == 0.0 and e["preserved"]["orange"] == 0.0
    assert e["preserved_others"] == 1.0
    table = pd.read_csv(erased / "toy_judgements.csv")
    assert table["preserved"].sum() == sum(it.group == "keep" and it.colour != "orange" for it in items)
    (base / "00000_0.png").unlink()
    pd.DataFrame(rows[1:]).to_csv(base / "metadata.csv", index=False)
    with pytest.raises(UserError, match="lacks 1 of the images"):
        evaluate.main(evaluate.parse_args(["toy", str(erased), "--base", str(base)]))
    # same file names, other prompts or seeds: not a pair
    for col, value in (("prompt", "a green circle"), ("seed", 12345)):
        moved = [dict(r, **{col: value}) if r["file"] == "00003_0.png" else r for r in rows]
        pd.DataFrame(moved).to_csv(base / "metadata.csv", index=False)
        (base / "00000_0.png").write_bytes((erased / "00000_0.png").read_bytes())
        with pytest.raises(UserError, match=f"1 images of .* have another {col} .* \\(first: 00003_0.png"):
            evaluate.main(evaluate.parse_args(["toy", str(erased), "--base", str(base)]))
    with pytest.raises(SystemExit):  # --concepts without --base would be ignored
        evaluate.parse_args(["toy", str(erased), "--concepts", "red"])
