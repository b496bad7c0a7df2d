"""Shared fixtures (tiny pipelines and the shipped toy model from fixtures.py), an offline hub, the generation tests'
prompt file and reference run, and the slow tests' order."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from fixtures import one_thread, shipped_toy, tiny_pipeline, tiny_vpred_pipeline  # noqa: E402,F401


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
