"""Fixtures of the experiments' tests (off the default test run: `python -m pytest experiments/tests` from the
repository root): the same as tests/ (tests/fixtures.py)."""
from __future__ import annotations

import os
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from fixtures import one_thread, shipped_toy, tiny_pipeline  # noqa: E402,F401 (tests/fixtures.py, on pytest's path)
