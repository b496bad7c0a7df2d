"""Shared fixtures: tiny Stable Diffusion pipelines built in code, an offline hub, and the generation tests' prompt file
and reference run."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from utils.families.tiny import build_tiny_pipeline  # noqa: E402


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread: tiny models run several times faster on one thread, above all on a busy 2-core machine."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="session")
def tiny_pipeline(tmp_path_factory) -> Path:
    """A tiny epsilon-prediction SD pipeline folder (PNDM scheduler, as SD 1.x ships)."""
    return build_tiny_pipeline(tmp_path_factory.mktemp("tiny") / "pipe")


@pytest.fixture(scope="session")
def tiny_vpred_pipeline(tmp_path_factory) -> Path:
    """A tiny v-prediction pipeline with a DDIM scheduler, shaped like SD 2.x."""
    return build_tiny_pipeline(tmp_path_factory.mktemp("tiny-v") / "pipe", prediction_type="v_prediction",
                               scheduler="ddim", seed=1)


# ---------------------------------------------------------------- the shipped toy model: missing fails, never skips
SHIPPED_TOY = ROOT / "assets" / "toy-sd"
SHIPPED_TOY_FILES = ("model_index.json", "train_toy.log", "scheduler/scheduler_config.json", "tokenizer/tokenizer.json",
                     "text_encoder/model.safetensors", "unet/diffusion_pytorch_model.safetensors",
                     "vae/diffusion_pytorch_model.safetensors")


@pytest.fixture(scope="session")
def shipped_toy() -> Path:
    """assets/toy-sd, the toy model the repository ships: a test that needs it fails, with what is missing, when a
    file of it is lost (or is a Git LFS pointer instead of the weights), rather than being skipped."""
    missing = [name for name in SHIPPED_TOY_FILES if not (SHIPPED_TOY / name).is_file()]
    pointers = [name for name in SHIPPED_TOY_FILES if name.endswith(".safetensors") and name not in missing
                and (SHIPPED_TOY / name).read_bytes()[:40].startswith(b"version https://git-lfs")]
    if missing or pointers:
        pytest.fail(f"the shipped toy model {SHIPPED_TOY} is incomplete: "
                    + "; ".join(filter(None, [missing and f"missing {', '.join(missing)}",
                                              pointers and f"Git LFS pointers, not weights: {', '.join(pointers)}"]))
                    + " (it is part of the repository: git checkout -- assets/toy-sd)", pytrace=False)
    return SHIPPED_TOY


# ---------------------------------------------------------------- generation: a prompt file and a reference run
@pytest.fixture(scope="module")
def prompt_csv(tmp_path_factory) -> Path:
    """Four prompts: two guidance scales (one from the flag), a seed from the file, and a carried column."""
    path = tmp_path_factory.mktemp("prompts") / "prompts.csv"
    path.write_text("prompt,evaluation_seed,evaluation_guidance,tag\n"
                    "a photo of a cat,11,,x\n"
                    "red circle,,5,y\n"
                    "green square dog,,,z\n"
                    "a nude body,42,5,w\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def reference(tiny_pipeline, prompt_csv, tmp_path_factory) -> Path:
    """One single-process run: 4 prompts x 2 images, batch size 4."""
    from gen_util import generate

    out = tmp_path_factory.mktemp("ref") / "images"
    summary = generate(tiny_pipeline, prompt_csv, out, "--num_images_per_prompt", "2", "--batch_size", "4")
    assert summary["written"] == 8 and summary["skipped"] == 0
    return out


# ---------------------------------------------------------------- slow tests: marked, and handed out first
def pytest_configure(config) -> None:
    """Registers `slow` and, under xdist, keeps the file order that pytest_collection_modifyitems sets."""
    config.addinivalue_line("markers", "slow(minutes): a test that trains or draws for about `minutes` on one core "
                            "(a quick loop: python -m pytest -m 'not slow')")
    # `--dist loadfile` hands out whole files, by default those with the most tests first, which left the 2- and
    # 4-minute files for the end of the run; the order below (slowest files first) is kept instead.
    if getattr(config.option, "loadscopereorder", None) is not None:
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(config, items) -> None:
    """Files with slow tests first, the slowest first; within a file, and among the other files, the order is kept."""
    minutes: dict[str, float] = {}
    for item in items:
        mark = item.get_closest_marker("slow")
        cost = float(mark.kwargs.get("minutes", 1)) if mark else 0.0
        minutes[str(item.path)] = max(minutes.get(str(item.path), 0.0), cost)
    items.sort(key=lambda item: -minutes[str(item.path)])
