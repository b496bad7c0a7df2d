"""Running a script's entry point (utils.cli.run, what `python SCRIPT` runs) in the test process."""
from __future__ import annotations

import sys
from typing import Callable, Sequence

import pytest

from utils.cli import run


def run_entry(monkeypatch, capsys, prog: str, main: Callable, parse_args: Callable,
              argv: Sequence[str]) -> tuple[int, str]:
    """`prog ARGV` through cli.run without paying the imports again: its exit code and what it wrote to stderr."""
    monkeypatch.setattr(sys, "argv", [prog, *argv])
    with pytest.raises(SystemExit) as stop:
        run(main, parse_args)
    return stop.value.code, capsys.readouterr().err
