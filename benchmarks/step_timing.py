"""Timing our trainer's steps from outside: a handler on its log lines, and a meter of step times and peak memory.

The trainer logs "training starts at step ..." right before its first step and "step N loss ... k K ..." after each
one (utils/train/loop.py); the benchmarks hook a handler onto that logger instead of touching the training loop.
"""
from __future__ import annotations

import logging
import re
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

_STEP = re.compile(r"step (\d+) loss .* k (\d+) ")


class StepWatcher(logging.Handler):
    """Calls started() at "training starts" and stepped(step, k) after each logged step."""

    def started(self) -> None:
        """The first step is about to run."""

    def stepped(self, step: int, k: int) -> None:
        """Step `step` (with k teacher sampling steps) has finished."""

    def emit(self, record: logging.LogRecord) -> None:
        msg = record.getMessage()
        if msg.startswith("training starts"):
            self.started()
        elif (m := _STEP.match(msg)):
            self.stepped(int(m.group(1)), int(m.group(2)))


@contextmanager
def watching(handler: logging.Handler) -> Iterator[logging.Handler]:
    """Every trainer run started inside the block logs to `handler` as well."""
    from utils.train import loop as trainer

    original = trainer.setup_logging

    def setup_logging(*a, **kw):
        logger = original(*a, **kw)
        logger.addHandler(handler)
        return logger

    trainer.setup_logging = setup_logging
    try:
        yield handler
    finally:
        trainer.setup_logging = original


class Meter:
    """Peak memory since `reset()` and step timestamps, for the CPU (VmHWM) or a CUDA device."""

    def __init__(self, device: str) -> None:
        import torch
        self.torch = torch
        self.cuda = device.startswith("cuda")
        self.times: list[float] = []
        self.load_peak = self.peak = self.start_resident = None
        self.exact = True

    def now(self) -> float:
        """perf_counter after the device finished its queued work."""
        if self.cuda:
            self.torch.cuda.synchronize()
        return time.perf_counter()

    def _status(self, key: str) -> float:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
        raise KeyError(key)

    def reset(self) -> None:
        """Remember the peak so far (loading), then restart peak tracking from the current usage."""
        if self.cuda:
            self.load_peak = self.torch.cuda.max_memory_allocated()
            self.start_resident = self.torch.cuda.memory_allocated()
            self.torch.cuda.reset_peak_memory_stats()
        else:
            self.load_peak, self.start_resident = self._status("VmHWM"), self._status("VmRSS")
            try:
                Path("/proc/self/clear_refs").write_text("5")
            except OSError:  # not Linux or not allowed: the peak then includes loading
                self.exact = False
        self.times = [self.now()]

    def mark_step(self) -> None:
        """Timestamp the end of a step."""
        self.times.append(self.now())

    def read_peak(self) -> None:
        """Peak since reset()."""
        self.peak = self.torch.cuda.max_memory_allocated() if self.cuda else self._status("VmHWM")

    def result(self) -> dict:
        """Step durations and memory numbers (bytes)."""
        return dict(step_s=[b - a for a, b in zip(self.times, self.times[1:])], peak=self.peak,
                    load_peak=self.load_peak, start_resident=self.start_resident, exact_peak=self.exact)
