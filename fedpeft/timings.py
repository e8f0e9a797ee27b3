"""Phase timestamps of a ClientApp process, for benchmarks (off unless asked for).

Flower starts a process per message in deployment (FLOWER.md §9.1), so what one
message costs — process start, imports, model, data, training, reply — decides a
deployment's round time. With ``FEDPEFT_CLIENT_TIMINGS=<file>`` in the environment,
:func:`mark` appends one JSON line per event to that file (``pid``, ``event``, wall
``time`` in seconds since the epoch, extras); the first mark of a process also writes
``process-start`` (from ``/proc/self/stat``, ±10 ms) and registers ``process-end`` at
exit. Without the variable it does nothing (one dictionary lookup).
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import pathlib
import time
from typing import Any

ENV = "FEDPEFT_CLIENT_TIMINGS"
_STARTED: set[int] = set()


def process_start() -> float | None:
    """When this process started (fork or exec), in seconds since the epoch (Linux)."""
    try:
        fields = pathlib.Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        uptime = float(pathlib.Path("/proc/uptime").read_text().split()[0])
    except (OSError, IndexError, ValueError):
        return None
    ticks = os.sysconf("SC_CLK_TCK")
    return time.time() - (uptime - int(fields[19]) / ticks)


def mark(event: str, **extra: Any) -> None:
    """Append ``event`` to ``$FEDPEFT_CLIENT_TIMINGS`` (no-op when unset)."""
    path = os.environ.get(ENV)
    if not path:
        return
    pid = os.getpid()
    lines = []
    if pid not in _STARTED:
        _STARTED.add(pid)
        lines.append({"pid": pid, "event": "process-start", "time": process_start()})
        atexit.register(mark, "process-end")
    lines.append({"pid": pid, "event": event, "time": time.time(), **extra})
    with contextlib.suppress(OSError), open(path, "a") as handle:
        handle.write("".join(json.dumps(line) + "\n" for line in lines))
