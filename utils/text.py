"""Concept and prompt lists from the command line (encoding them is the model family's: utils/families/)."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from utils.cli import UserError


def read_word_list(values: Sequence[str] | None, what: str) -> list[str]:
    """Words from the command line, or the lines of one .txt file (blank lines and # comments skipped)."""
    values = [v for v in (values or []) if v.strip()]
    if len(values) == 1 and (values[0].endswith(".txt") or Path(values[0]).is_file()):
        path = Path(values[0])
        if not path.is_file():
            raise UserError(f"{what} file {path} does not exist")
        values = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()]
        values = [v for v in values if v and not v.startswith("#")]
        if not values:
            raise UserError(f"{what} file {path} is empty")
    if not values:
        raise UserError(f"no {what} given")
    return [v.strip() for v in values]
