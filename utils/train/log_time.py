"""How long a trainer run trained, read from its train.log: every leg of a stopped and resumed run added up.

The trainer (utils/train/loop.py) logs "args ..." first in each invocation, "training starts at step S of N" right
before its first step, and "trained N steps in X s" when it reaches the last step (X: that invocation's time only).
A leg that was stopped (SIGINT/SIGTERM, or killed) has no such line: it counts from its start to its last line.
"""
from __future__ import annotations

import re
from datetime import datetime

_LINE = re.compile(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) \S+ (.*)")  # utils.cli.setup_logging's format
_START = re.compile(r"training starts at step (\d+) of \d+")
_TRAINED = re.compile(r"trained \d+ steps in ([0-9.]+) s")


def training_seconds_in(text: str) -> float | None:
    """The training time of the run a train.log's text ends with (its legs since the last start at step 0; the log
    appends, so a folder overwritten with --overwrite_output_dir holds older runs too); None when it logged none."""
    lines = [(m.group(1), m.group(2)) for m in map(_LINE.match, text.splitlines()) if m]
    starts = [i for i, (_, msg) in enumerate(lines) if _START.match(msg)]
    if not starts:  # a log without start lines: the last "trained" line, as before
        found = _TRAINED.findall(text)
        return float(found[-1]) if found else None
    fresh = [i for i in starts if _START.match(lines[i][1]).group(1) == "0"]
    legs = [i for i in starts if i >= (fresh[-1] if fresh else starts[0])]
    total = 0.0
    for n, start in enumerate(legs):
        leg = lines[start + 1:legs[n + 1] if n + 1 < len(legs) else len(lines)]
        trained = next((m for _, msg in leg if (m := _TRAINED.match(msg))), None)
        if trained is not None:
            total += float(trained.group(1))
            continue
        ran = [stamp for stamp, _ in leg[:next((j for j, (_, msg) in enumerate(leg) if msg.startswith("args ")),
                                               len(leg))]]
        if ran:
            total += (_time(ran[-1]) - _time(lines[start][0])).total_seconds()
    return total


def _time(stamp: str) -> datetime:
    return datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f")
