"""Timing our trainer's steps from outside: a handler on its log lines, a meter of step times and peak memory, and
the table bench_train.py prints from them.

The trainer logs "training starts at step ..." right before its first step and "step N loss ... k K ..." after each
one (utils/train/loop.py); the benchmarks hook a handler onto that logger instead of touching the training loop.
"""
from __future__ import annotations

import logging
import re
import statistics
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

GIB = 2 ** 30
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


# ------------------------------------------------------------------------------------------------ the table
def _median_step(res: list[dict], warmup: int) -> float:
    return statistics.median([s for r in res for s in r["step_s"][warmup:]])


def fit_steps(points: list[tuple[int, float]]) -> tuple[float, float] | None:
    """Least-squares s/step = a + b k over (k, seconds): a = fixed cost of a step, b = cost of one sampling step."""
    if len({k for k, _ in points}) < 2:
        return None
    n = len(points)
    mk, mt = sum(k for k, _ in points) / n, sum(t for _, t in points) / n
    b = sum((k - mk) * (t - mt) for k, t in points) / sum((k - mk) ** 2 for k, _ in points)
    return mt - b * mk, b


def summarize(results: list[dict], warmup: int) -> list[dict]:
    """One row per (method, precision): median s/step and peak memory of each layout, and ours / reference."""
    rows = []
    fp32_ref = {r["method"]: r["peak"] for r in results if r["layout"] == "reference" and r["precision"] == "no"}
    keys = list(dict.fromkeys((r["method"], r["precision"]) for r in results))
    for method, prec in keys:
        row = dict(method=method, precision="fp32" if prec == "no" else prec)
        for name, layout in (("ours", "ours"), ("ref", "reference")):
            rs = [r for r in results if (r["method"], r["precision"], r["layout"]) == (method, prec, layout)]
            row[f"{name}_ks"] = rs[0]["ks"] if rs else None
            row[f"{name}_s"] = _median_step(rs, warmup) if rs else None
            for key in ("peak", "load_peak", "start_resident"):
                row[f"{name}_{key}"] = max(r[key] for r in rs) if rs else None
        both = row["ours_s"] is not None and row["ref_s"] is not None
        row["time_ratio"] = row["ours_s"] / row["ref_s"] if both else None
        row["mem_ratio"] = row["ours_peak"] / row["ref_peak"] if both else None
        row["mem_ratio_fp32_ref"] = (row["ours_peak"] / fp32_ref[method]
                                     if method in fp32_ref and row["ours_peak"] is not None else None)
        for name, layout in (("ours", "ours"), ("ref", "reference")):
            pts = [(k, t) for r in results if (r["method"], r["precision"], r["layout"]) == (method, prec, layout)
                   for k, t in list(zip(r["ks"], r["step_s"]))[warmup:]]
            row[f"{name}_fit"] = fit_steps(pts)
        phases = [p for r in results if (r["method"], r["precision"], r["layout"]) == (method, prec, "reference")
                  for p in (r["phases"] or [])[warmup:]]
        row["ref_phases"] = {k: statistics.median([p[k] for p in phases]) for k in phases[0]} if phases else None
        rows.append(row)
    return rows


def _fmt(x: float | None, spec: str, scale: float = 1.0, bold: bool = False) -> str:
    if x is None:
        return "n/a"
    text = format(x / scale, spec)
    return f"**{text}**" if bold else text


def format_table(rows: list[dict], header: str) -> str:
    """The markdown table printed at the end of a run."""
    lines = [header, "",
             "| method | precision | ours s/step | ref s/step | time ours/ref | ours peak GiB | ref peak GiB "
             "| peak ours/ref | ours / fp32 ref | load peak ours / ref GiB | k per step |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        ks = r["ours_ks"] or r["ref_ks"]
        lines.append(f"| {r['method']} | {r['precision']} | {_fmt(r['ours_s'], '.4g')} | {_fmt(r['ref_s'], '.4g')} | "
                     f"{_fmt(r['time_ratio'], '.2f', bold=True)} | {_fmt(r['ours_peak'], '.2f', GIB)} | "
                     f"{_fmt(r['ref_peak'], '.2f', GIB)} | {_fmt(r['mem_ratio'], '.2f', bold=True)} | "
                     f"{_fmt(r['mem_ratio_fp32_ref'], '.2f')} | {_fmt(r['ours_load_peak'], '.2f', GIB)} / "
                     f"{_fmt(r['ref_load_peak'], '.2f', GIB)} | {','.join(map(str, ks))} |")
    fit_rows = [r for r in rows if r["ours_fit"] and r["ref_fit"]]
    if fit_rows:
        lines += ["", "Step time fitted as a + b k over the timed steps (a: fixed cost, b: one guided sampling step), "
                  "and the ratio it projects for N = 50 (mean k = 24.5):", "",
                  "| method | precision | ours a | ours b | ref a | ref b | projected time ours/ref, N = 50 |",
                  "|---|---|---:|---:|---:|---:|---:|"]
        for r in fit_rows:
            (ao, bo), (ar, br) = r["ours_fit"], r["ref_fit"]
            lines.append(f"| {r['method']} | {r['precision']} | {ao:.3g} | {bo:.3g} | {ar:.3g} | {br:.3g} | "
                         f"{(ao + 24.5 * bo) / (ar + 24.5 * br):.2f} |")
    phase_rows = [r for r in rows if r["ref_phases"]]
    if phase_rows:
        lines += ["", "Reference layout, median seconds per step by phase (timed steps):", "",
                  "| method | precision | text encoding | teacher sampling | student fwd/bwd + AdamW | full EMA |",
                  "|---|---|---:|---:|---:|---:|"]
        for r in phase_rows:
            p = r["ref_phases"]
            lines.append(f"| {r['method']} | {r['precision']} | {p['text']:.3f} | {p['sample']:.3f} | "
                         f"{p['train']:.3f} | {p['ema']:.3f} |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ command line
