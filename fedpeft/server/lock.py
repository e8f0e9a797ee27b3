"""One writer per output directory: an advisory lock held for a run's whole life.

Two server processes writing one output directory interleave their checkpoints,
``details.jsonl`` and adapter. That happens without any user error in Flower's
``process`` isolation (the compose layout): when the SuperLink crashes and its ServerApp
SuperExec survives, the ServerApp keeps running, reconnects to the restarted SuperLink
and finishes the run by itself — so a ``--resume`` submitted meanwhile would start a
second writer. :class:`OutputLock` makes the second one fail at start-up, before it
writes anything, with the holder's pid, host and start time.

The lock is ``flock(2)`` on ``<dir>/.fedpeft-run.lock``: the kernel drops it when the
holder exits, however it exits (a SIGKILLed run leaves no stale lock). The file itself
stays (deleting it on release would let two later runs lock two different files).
Where ``fcntl`` does not exist (Windows) the lock is skipped, and said so at debug level.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import pathlib
import socket
from typing import IO

from fedpeft.errors import FedPeftError

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger("fedpeft")

LOCK_NAME = ".fedpeft-run.lock"


class OutputLock:
    """An exclusive, non-blocking lock on a run's output directory.

    Args:
        directory: the directory (created if missing).
    """

    def __init__(self, directory: pathlib.Path) -> None:
        self.path = pathlib.Path(directory) / LOCK_NAME
        self._handle: IO[str] | None = None

    def acquire(self) -> None:
        """Take the lock and record this process as its holder.

        Raises:
            FedPeftError: another live process holds it (named in the message).
        """
        if fcntl is None:  # pragma: no cover - not POSIX
            log.debug("no fcntl here: %s is not locked", self.path.parent)
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+", encoding="utf-8")  # noqa: SIM115 - held until release()
        _lock_or_raise(handle, self.path)
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps({
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "since": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        }))
        handle.flush()
        self._handle = handle

    def release(self) -> None:
        """Drop the lock (idempotent)."""
        handle, self._handle = self._handle, None
        if handle is not None:
            fcntl.flock(handle, fcntl.LOCK_UN)
            handle.close()

    @property
    def held(self) -> bool:
        """Whether this object holds the lock."""
        return self._handle is not None


def check_unlocked(directory: pathlib.Path) -> None:
    """Raise if a live run holds ``directory``'s lock; change nothing.

    For the command line's checks before a run starts (``--overwrite`` deletes files and
    ``--resume`` continues a checkpoint: neither may touch a directory in use).

    Raises:
        FedPeftError: the directory is in use (the holder is named).
    """
    path = pathlib.Path(directory) / LOCK_NAME
    if fcntl is None or not path.is_file():
        return
    with open(path, encoding="utf-8") as handle:
        _lock_or_raise(handle, path)
        fcntl.flock(handle, fcntl.LOCK_UN)


def _lock_or_raise(handle: IO[str], path: pathlib.Path) -> None:
    """``flock`` ``handle`` exclusively without waiting; closes it and raises if held."""
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "{}"
        handle.close()
        raise FedPeftError(
            f"output directory {path.parent} is in use by another fedpeft run "
            f"({_describe(holder)}): two runs writing one directory would interleave "
            "their checkpoints. If the SuperLink restarted in `process` isolation, the "
            "first run's ServerApp survived and finishes the run by itself: wait for it "
            "(or stop it) before resuming, or choose another output.dir"
        ) from None


def _describe(holder: str) -> str:
    try:
        info = json.loads(holder)
        return f"pid {info['pid']} on {info['host']}, since {info['since']}"
    except (ValueError, KeyError, TypeError):
        return "holder unknown"
