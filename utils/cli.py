"""Command-line plumbing shared by every script: one-line errors, logging, device choice."""
from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch


class UserError(Exception):
    """Bad input from the user: reported as one line, exit code 2, no traceback."""


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Show defaults and keep the module docstring's layout."""

    def _get_help_string(self, action: argparse.Action) -> str:
        """The help, with `(default: ...)` unless the flag is required or its help already tells its default."""
        text = action.help or ""
        if action.required or "default" in text or (action.default is None and ("None" in text or action.nargs == 0)):
            return text
        return super()._get_help_string(action)


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


class Stopped(Exception):
    """A run stopped by a signal after saving its state: exit code 128 + signal number, the message printed last."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.exit_code = 128 + signum


def run(main: Callable[[argparse.Namespace], object], parse_args: Callable[[Sequence[str] | None], argparse.Namespace]) -> None:
    """Entry point for `if __name__ == "__main__"`: UserError -> one line and exit 2; Stopped -> its hint, 128 + signal."""
    try:
        main(parse_args(None))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except Stopped as e:  # 130 for SIGINT, 143 for SIGTERM, so that `set -e` scripts stop here
        sys.stdout.flush()
        print(e, file=sys.stderr)
        sys.exit(e.exit_code)
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


@contextlib.contextmanager
def log_kept() -> Iterator[None]:
    """Run other tools inside (each points the log at its own folder); afterwards the log file is this one again."""
    files = [h.baseFilename for h in logging.getLogger("sdd").handlers if isinstance(h, logging.FileHandler)]
    try:
        yield
    finally:
        if files:
            setup_logging(Path(files[0]).parent, Path(files[0]).name)


def add_threads_arg(parser: argparse.ArgumentParser) -> None:
    """`--threads N`: torch's CPU thread count (0 = auto, see apply_threads)."""
    parser.add_argument("--threads", type=int, default=0,
                        help="torch CPU threads; 0 = auto: on the CPU, the usable cores that are idle now (at least "
                             "1), so a busy machine is not oversubscribed, or OMP_NUM_THREADS if set; on a GPU, "
                             "torch's default")


PROC_STAT = "/proc/stat"


def _cpu_times() -> dict[int, tuple[int, int]]:
    """Per CPU of /proc/stat: (idle + iowait, total) clock ticks since boot."""
    times = {}
    with open(PROC_STAT, encoding="ascii") as f:
        for line in f:
            name, *fields = line.split()
            if name.startswith("cpu") and name[3:].isdigit():
                ticks = [int(x) for x in fields[:8]]  # user nice system idle iowait irq softirq steal
                times[int(name[3:])] = (sum(ticks[3:5]), sum(ticks))
    return times


def idle_cores(cpus: Sequence[int], interval: float = 0.2) -> float | None:
    """How many of `cpus` were idle over the next `interval` seconds (e.g. 1.9 on an idle 2-core machine), from two
    samples of /proc/stat; None where there is no /proc/stat (not Linux)."""
    try:
        before = _cpu_times()
        time.sleep(interval)
        after = _cpu_times()
    except (OSError, ValueError):
        return None
    idle = 0.0
    for cpu in cpus:
        if cpu in before and cpu in after:
            ticks = after[cpu][1] - before[cpu][1]
            idle += (after[cpu][0] - before[cpu][0]) / ticks if ticks > 0 else 1.0
    return idle


def auto_threads() -> tuple[int, str]:
    """--threads 0 on the CPU: the usable cores that are idle now (>= 1), and how that was found. Idle is measured
    over 0.2 s; the 1-minute load average (the fallback without /proc/stat) still counts the command that just
    ended, which on an idle 2-core machine left room for only one thread."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    idle = idle_cores(cpus)
    if idle is not None:
        return max(1, min(len(cpus), round(idle))), f"auto: {idle:.1f} of {len(cpus)} cores idle"
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    return max(1, len(cpus) - round(load)), f"auto: {len(cpus)} cores, load average {load:.1f}"


def apply_threads(n: int, device: torch.device) -> int:
    """Set torch's thread count: N if given; auto (0) on the CPU = the usable cores idle now (>= 1), unless
    OMP_NUM_THREADS is set; a GPU run keeps torch's default. On the CPU it prints the count and why; returns it."""
    if n < 0:
        raise UserError(f"--threads must be >= 0 (0 = auto), got {n}")
    if n == 0 and device.type != "cpu":
        return torch.get_num_threads()  # a GPU run: left as it is
    if n == 0 and os.environ.get("OMP_NUM_THREADS"):
        n, why = torch.get_num_threads(), f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}"  # the user's own: kept
    elif n == 0:
        n, why = auto_threads()
    else:
        why = f"--threads {n}"
    torch.set_num_threads(n)
    print(f"using {n} torch thread{'s' if n != 1 else ''} ({why})", flush=True)
    return n


def same_flag_value(a: Any, b: Any) -> bool:
    """Equal flag values; two spellings of one existing local path ('./assets/x', 'assets/x/') count as equal, and so
    do a number and a list of just that number (a flag that became one value per concept)."""
    if a == b:
        return True
    if isinstance(a, list) != isinstance(b, list):
        one, other = (a, b) if isinstance(a, list) else (b, a)
        return len(one) == 1 and one[0] == other
    return (isinstance(a, str) and isinstance(b, str) and os.path.exists(a) and os.path.exists(b)
            and os.path.samefile(a, b))
