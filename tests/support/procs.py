"""Shared by the deployment tests: their tiny run config, and the processes a deployment
left behind."""

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


def alive(pid: int) -> bool:
    """``pid`` exists and is not a zombie (Linux /proc)."""
    try:
        state = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


TINY_DEPLOY = {
    "model.name": "tiny-bert",
    "data.max-examples": "32",
    "data.test-size": "100",
    "train.local-steps": "4",
    "train.lr": "5e-3",
    "seed": "3",
}
"""A deployment run in seconds (tiny-bert, 4 steps), as ``flwr run -c`` strings."""
