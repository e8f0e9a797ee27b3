"""What a run directory holds, for tests that check a refusal changed nothing."""

from __future__ import annotations

import pathlib

from fedpeft.server.lock import LOCK_NAME


def snapshot(directory: pathlib.Path) -> dict[str, bytes]:
    """Every file's bytes below ``directory`` but the run lock's (its holder record is
    not run data: a refused run takes the lock before it is refused)."""
    return {
        str(p.relative_to(directory)): p.read_bytes()
        for p in sorted(directory.rglob("*"))
        if p.is_file() and p.name != LOCK_NAME
    }
