"""One-off studies: each script answered one question, and its first line says which and where the answer is
written (docs/notes/, or the page named). Run from the repository root as modules, `python -m experiments.NAME`;
their tests (experiments/tests/) are off the default test run: `python -m pytest experiments/tests`."""
