"""Shared fixtures: tiny Stable Diffusion pipelines built in code, and an offline hub."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from utils.tiny import build_tiny_pipeline  # noqa: E402


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
