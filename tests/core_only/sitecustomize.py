"""Put this folder first on PYTHONPATH to run Python as if only requirements.txt's packages were installed.

Every top-level module named in SDD_TEST_BLOCKED_MODULES (comma-separated; tests/test_install.py computes them: the
installed packages that requirements.txt does not bring, such as scipy, nudenet, onnxruntime, cv2, torchmetrics and
pytest) is hidden: `import scipy` raises ModuleNotFoundError and `importlib.util.find_spec("scipy")` is None, as on a
machine where it is not installed, so libraries that probe for optional packages (diffusers, transformers) see it
missing too. Python imports this file at start-up (the `site` module's sitecustomize hook)."""
import os
import sys

BLOCKED = frozenset(filter(None, os.environ.get("SDD_TEST_BLOCKED_MODULES", "").split(",")))


class _Hidden:
    """A meta-path finder that finds nothing under a blocked top-level name and defers to `finder` for the rest."""

    def __init__(self, finder) -> None:
        self._finder = finder

    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in BLOCKED:
            return None
        find_spec = getattr(self._finder, "find_spec", None)
        return find_spec(name, path, target) if find_spec is not None else None

    def __getattr__(self, attr):  # invalidate_caches, find_distributions, ...
        return getattr(self._finder, attr)


if BLOCKED:
    sys.meta_path[:] = [_Hidden(f) for f in sys.meta_path]
