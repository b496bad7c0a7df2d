"""Command-line plumbing shared by every script: one-line errors, logging, device choice."""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Callable, Sequence

import torch


class UserError(Exception):
    """Bad input from the user: reported as one line, exit code 2, no traceback."""


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Show defaults and keep the module docstring's layout."""


class ArgumentParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are three lines: a short usage, `error: ...` and where the help is."""

    def short_usage(self) -> str:
        """`usage: PROG` with only the required arguments, then `[options]`."""
        required = [a for a in self._actions if a.required or not a.option_strings]
        formatter = self._get_formatter()
        formatter.add_usage(None, required, [], prefix="usage: ")
        return " ".join(formatter.format_help().split()) + " [options]"

    def error(self, message: str):
        """Print the short usage, the error line and `see PROG --help`; exit with code 2."""
        self.exit(2, f"{self.short_usage()}\nerror: {message}\nsee: {self.prog} --help\n")


def run(main: Callable[[argparse.Namespace], object], parse_args: Callable[[Sequence[str] | None], argparse.Namespace]) -> None:
    """Entry point for `if __name__ == "__main__"`: turns UserError into a one-line message."""
    try:
        main(parse_args(None))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


def resolve_device(device: str | None) -> torch.device:
    """`auto`/None -> cuda when available, else cpu."""
    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise UserError(f"unknown device {device!r}: {e}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {device!r} asked for but CUDA is not available")
    return dev


DTYPES = {"no": torch.float32, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def resolve_dtype(mixed_precision: str | None, device: torch.device) -> torch.dtype:
    """`--mixed_precision` -> dtype of the frozen weights; None means fp16 on cuda, fp32 elsewhere."""
    if mixed_precision is None:
        return torch.float16 if device.type == "cuda" else torch.float32
    return DTYPES[mixed_precision]


def setup_logging(output_dir: str | os.PathLike, filename: str) -> logging.Logger:
    """Log to OUTPUT_DIR/filename (appending, so a resumed run keeps its history) and to stderr at WARNING."""
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    logger = logging.getLogger("sdd")
    logger.setLevel(logging.INFO)
    for h in list(logger.handlers):
        logger.removeHandler(h)
        h.close()
    fh = logging.FileHandler(Path(output_dir) / filename)
    fh.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    logger.addHandler(fh)
    sh = logging.StreamHandler()
    sh.setLevel(logging.WARNING)
    logger.addHandler(sh)
    logger.propagate = False
    return logger
