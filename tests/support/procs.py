"""Processes a deployment test left behind, found by an environment marker."""

from __future__ import annotations

import pathlib


def processes_with_env(marker: str) -> list[int]:
    """PIDs of the processes whose environment contains ``marker`` (e.g. ``FLWR_HOME=…``,
    unique to one deployment): what a test asserts is empty after the deployment stopped."""
    found = []
    for entry in pathlib.Path("/proc").glob("[0-9]*"):
        try:
            if marker.encode() in (entry / "environ").read_bytes():
                found.append(int(entry.name))
        except OSError:
            continue
    return found
