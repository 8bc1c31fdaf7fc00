"""Start-up and shut-down timeline, for `bench/startup.py`: where the seconds between a
command and its first training step go.

Off unless VIT_TIMELINE names a file; then every `mark(event)`, in any process of the run on
this machine (the driver, the Train controller, the workers, a Tune trial), appends one JSON
line {"t": wall-clock seconds, "event": ..., "pid": ...}. Ray's processes inherit the variable
from the driver that started Ray, or from a job's runtime environment (`ray job submit
--runtime-env-json '{"env_vars": {"VIT_TIMELINE": ...}}'`), so the marks of one run land in one
file. Appends of one short line are atomic on a local filesystem (O_APPEND), so processes do
not interleave within a line. Costs nothing when off: one environment lookup.
"""

from __future__ import annotations

import json
import os
import time

ENV = "VIT_TIMELINE"


def mark(event: str, **fields) -> None:
    """Record that `event` happened now (a no-op unless VIT_TIMELINE is set)."""
    path = os.environ.get(ENV)
    if not path:
        return
    line = json.dumps({"t": time.time(), "event": event, "pid": os.getpid(), **fields})
    try:
        with open(path, "a") as f:
            f.write(line + "\n")
    except OSError:
        pass                        # a benchmark aid must never stop a run


def read(path: str) -> list[dict]:
    """The marks in a timeline file, oldest first."""
    with open(path) as f:
        marks = [json.loads(line) for line in f if line.strip()]
    return sorted(marks, key=lambda m: m["t"])
