"""Fixtures of the experiments' tests (off the default test run: `python -m pytest experiments/tests` from the
repository root): the tiny pipeline, one torch thread, the shipped toy model."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[2]
TOY = ROOT / "assets" / "toy-sd"
needs_toy = pytest.mark.skipif(not (TOY / "model_index.json").exists(), reason="assets/toy-sd not present")


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread: tiny models run several times faster on one thread."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="session")
def tiny_pipeline(tmp_path_factory) -> Path:
    """A tiny epsilon-prediction SD pipeline folder (as tests/conftest.py builds it)."""
    from utils.tiny import build_tiny_pipeline

    return build_tiny_pipeline(tmp_path_factory.mktemp("tiny") / "pipe")
