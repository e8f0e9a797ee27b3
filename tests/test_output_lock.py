"""One writer per output directory (``fedpeft.server.lock``).

A second server on a directory another live run writes is refused before it writes
anything, naming the holder; the lock dies with its holder, however the holder exits.
"""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import textwrap

import pytest

from fedpeft.errors import FedPeftError
from fedpeft.server.lock import LOCK_NAME, OutputLock

TINY = {"model.name": "tiny-bert", "data.max-examples": 32, "data.test-size": 16, "federation.clients": 2}


def test_a_second_lock_on_a_directory_is_refused_naming_the_holder(tmp_path):
    first, second = OutputLock(tmp_path), OutputLock(tmp_path)
    first.acquire()
    with pytest.raises(FedPeftError, match=rf"in use by another fedpeft run \(pid {os.getpid()} on "):
        second.acquire()
    assert first.held and not second.held
    first.release()
    second.acquire()  # free again
    assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    second.release()
    second.release()  # idempotent


def _holder(directory: pathlib.Path) -> subprocess.Popen:
    """Another process that takes the lock on ``directory`` and sleeps."""
    code = textwrap.dedent(f"""
        import time
        from fedpeft.server.lock import OutputLock
        lock = OutputLock({str(directory)!r})
        lock.acquire()
        print("locked", flush=True)
        time.sleep(600)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_a_run_on_a_directory_another_process_writes_is_refused_and_changes_nothing(tmp_path):
    from fedpeft.server.run import ServerRun

    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text('{"kept": true}')
    holder = _holder(out)
    try:
        with pytest.raises(FedPeftError, match=rf"{out} is in use by another fedpeft run \(pid {holder.pid} "):
            ServerRun({**TINY, "output.dir": str(out)})
        assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME, "config.json"]
        assert (out / "config.json").read_text() == '{"kept": true}'
        # the holder is killed (no clean-up of its own): the lock goes with it
        holder.send_signal(signal.SIGKILL)
        holder.wait(30)
        run = ServerRun({**TINY, "output.dir": str(out)})
        run.close()
        assert json.loads((out / "config.json").read_text())["config"]["model.name"] == "tiny-bert"
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()


def test_a_checkpoint_directory_outside_the_output_is_locked_too(tmp_path):
    from fedpeft.server.run import ServerRun

    ckpt = tmp_path / "shared-ckpt"
    first = ServerRun({**TINY, "output.dir": str(tmp_path / "a"), "checkpoint.every": 1, "checkpoint.dir": str(ckpt)})
    try:
        with pytest.raises(FedPeftError, match=f"{ckpt} is in use"):
            ServerRun({**TINY, "output.dir": str(tmp_path / "b"), "checkpoint.every": 1, "checkpoint.dir": str(ckpt)})
    finally:
        first.close()
    # released: the second run takes both directories, and gives them back on close
    ServerRun({**TINY, "output.dir": str(tmp_path / "b"), "checkpoint.every": 1, "checkpoint.dir": str(ckpt)}).close()
    for directory in (tmp_path / "b", ckpt):
        lock = OutputLock(directory)
        lock.acquire()
        lock.release()


def test_run_server_releases_the_directory_when_it_ends(tmp_path):
    from fedpeft.flower.inprocess import run_in_process

    out = tmp_path / "run"
    run_in_process({**TINY, "federation.rounds": 1, "train.local-steps": 1, "output.dir": str(out)})
    lock = OutputLock(out)
    lock.acquire()  # nothing holds it any more
    lock.release()


@pytest.mark.parametrize("how", ["overwrite", "resume"])
def test_the_command_line_neither_deletes_nor_resumes_a_run_in_progress(tmp_path, how):
    from fedpeft.preflight import prepare_run

    out = tmp_path / "run"
    out.mkdir()
    (out / "summary.json").write_text("{}")
    holder = _holder(out)
    try:
        flat = {**TINY, "output.dir": str(out), "checkpoint.resume": how == "resume"}
        with pytest.raises(FedPeftError, match=f"pid {holder.pid} "):
            prepare_run(flat, overwrite=how == "overwrite")
        assert (out / "summary.json").read_text() == "{}"
    finally:
        holder.kill()
        holder.wait()
