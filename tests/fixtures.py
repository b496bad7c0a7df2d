"""Fixtures shared by tests/ and experiments/tests/ (each conftest.py imports them): one torch thread, tiny Stable
Diffusion pipelines built in code, and the shipped toy model, which fails a test when lost, never skips it."""
from __future__ import annotations

from pathlib import Path

import pytest

from utils.families.tiny import build_tiny_pipeline

ROOT = Path(__file__).resolve().parents[1]


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


