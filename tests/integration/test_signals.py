"""Ctrl-C, SIGTERM and engine failures of ``fedpeft simulate`` on the real Ray engine.

Each run is ``python -m fedpeft.cli simulate`` started in a new session (as a shell
starts a job), with its own ``FLWR_HOME`` and ``FEDPEFT_CACHE``. Every process the run
starts (gcs_server, raylet, agents, ClientApp actors) inherits that session id, so
"nothing left running" is checked by scanning ``/proc`` for the session — other Ray
runs on the machine are not counted. Ctrl-C is sent the way a terminal sends it: SIGINT
to the whole process group. Clients sleep ``faults.slow-seconds`` every round so that a
signal sent just after round 1's checkpoint lands inside round 2.
"""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest

from tests.support.cli_env import cli_env

ROOT = pathlib.Path(__file__).resolve().parents[2]
SLOW = 6.0  # seconds every client sleeps in every round
SETS = [
    "model.name=tiny-bert",
    "data.max-examples=32",
    "data.test-size=100",
    "train.local-steps=4",
    "train.lr=5e-3",
    "faults.slow-rate=1.0",
    f"faults.slow-seconds={SLOW}",
]
STARTUP_TIMEOUT = 420.0  # Ray start + round 1 on a busy 2-core machine
STOP_LIMIT = 30.0  # the bound: back at the shell in under 30 s


def _env(tmp_path: pathlib.Path) -> dict[str, str]:
    env = cli_env(tmp_path / "flwr-home", tmp_path / "fedpeft-cache")
    return env


def _simulate(tmp_path: pathlib.Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "fedpeft.cli", "simulate", "--quiet", *args]


def _start(tmp_path: pathlib.Path, out: pathlib.Path, rounds: int = 3) -> subprocess.Popen[str]:
    sets = [a for s in SETS for a in ("--set", s)]
    cmd = _simulate(tmp_path, "--rounds", str(rounds), "--clients", "2", "--out", str(out), *sets)
    return subprocess.Popen(
        cmd,
        cwd=tmp_path,
        env=_env(tmp_path),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def session_processes(sid: int) -> list[tuple[int, str]]:
    """``(pid, name)`` of every live (non-zombie) process in session ``sid``."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = pathlib.Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2 :].split()
        state, session = fields[0], int(fields[3])
        if session == sid and state not in ("Z", "X"):
            found.append((int(entry), name))
    return found


def _wait_for_round_1(proc: subprocess.Popen[str], out: pathlib.Path) -> None:
    latest = out / "checkpoint" / "LATEST"
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while time.monotonic() < deadline and proc.poll() is None:
        if latest.exists() and latest.read_text().strip() == "ckpt-000001":
            return
        time.sleep(0.2)
    proc.kill()
    _, err = proc.communicate()
    pytest.fail(f"round 1 did not finish (exit {proc.returncode}): {err[-3000:]}")


def _stop_and_collect(proc: subprocess.Popen[str], send: object) -> tuple[str, float]:
    started = time.monotonic()
    send()  # type: ignore[operator]
    try:
        _, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        _, err = proc.communicate()
        pytest.fail(f"the run did not stop within 120 s: {err[-3000:]}")
    return err, time.monotonic() - started


def _assert_nothing_left(sid: int) -> None:
    deadline = time.monotonic() + 3.0
    left = session_processes(sid)
    while left and time.monotonic() < deadline:
        time.sleep(0.2)
        left = session_processes(sid)
    if left:
        for pid, _ in left:  # do not leave them to the next test
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
    assert left == [], f"processes of the run still running after it exited: {left}"


def _one_line(stderr: str, prefix: str) -> str:
    assert "Traceback" not in stderr, stderr[-3000:]
    lines = [line for line in stderr.splitlines() if line.startswith(prefix)]
    assert len(lines) == 1, stderr[-3000:]
    return lines[0]


def _stopped_during_round_2(tmp_path: pathlib.Path, signum: int) -> tuple[pathlib.Path, str]:
    """Start a 3-round run, send ``signum`` inside round 2, check the stop; return the run
    directory and the ``stopped:`` line."""
    out = tmp_path / "run"
    proc = _start(tmp_path, out)
    _wait_for_round_1(proc, out)
    names = {name for _, name in session_processes(proc.pid)}
    assert {"raylet", "gcs_server"} <= names, names  # the check below would be meaningful
    time.sleep(1.0)  # inside round 2: every client sleeps SLOW s before training

    def send() -> None:
        if signum == signal.SIGINT:
            os.killpg(proc.pid, signum)  # what a terminal's Ctrl-C does
        else:
            os.kill(proc.pid, signum)  # what `kill PID` does

    stderr, seconds = _stop_and_collect(proc, send)
    assert proc.returncode == 128 + signum, (proc.returncode, stderr[-3000:])
    assert seconds < STOP_LIMIT, f"took {seconds:.1f} s to stop"
    _assert_nothing_left(proc.pid)
    line = _one_line(stderr, "stopped: ")
    assert f"interrupted by {signal.Signals(signum).name}" in line
    assert "the last complete checkpoint is round 1 of 3" in line
    assert line.endswith(f"resume with: fedpeft simulate --resume {out}")
    # the signal landed inside round 2: round 2 never completed
    assert (out / "checkpoint" / "LATEST").read_text().strip() == "ckpt-000001"
    return out, line


@pytest.mark.integration
def test_ctrl_c_in_round_2_stops_within_seconds_and_the_run_resumes(tmp_path):
    from fedpeft.checkpoint import load_latest

    out, _ = _stopped_during_round_2(tmp_path, signal.SIGINT)
    checkpoint = load_latest(out / "checkpoint")
    assert checkpoint is not None and checkpoint.server_round == 1
    assert [r["round"] for r in checkpoint.meta["results"]] == [0, 1]

    resumed = subprocess.run(
        _simulate(tmp_path, "--resume", str(out)),
        cwd=tmp_path,
        env=_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=STARTUP_TIMEOUT + 120,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    rounds = json.loads((out / "summary.json").read_text())["rounds"]
    assert [r["round"] for r in rounds] == [0, 1, 2, 3]
    assert all(r["failed"] == 0 for r in rounds[1:])


@pytest.mark.integration
def test_sigterm_in_round_2_stops_within_seconds_with_exit_143(tmp_path):
    from fedpeft.checkpoint import load_latest

    out, _ = _stopped_during_round_2(tmp_path, signal.SIGTERM)
    checkpoint = load_latest(out / "checkpoint")
    assert checkpoint is not None and checkpoint.server_round == 1


@pytest.mark.integration
def test_a_client_actor_that_dies_ends_the_run_with_an_error_line(tmp_path):
    out = tmp_path / "run"
    proc = _start(tmp_path, out)
    _wait_for_round_1(proc, out)
    time.sleep(1.0)  # inside round 2
    actors = [pid for pid, name in session_processes(proc.pid) if name.startswith("ray::ClientApp")]
    assert actors, session_processes(proc.pid)
    stderr, seconds = _stop_and_collect(proc, lambda: os.kill(actors[0], signal.SIGKILL))
    assert proc.returncode == 2, (proc.returncode, stderr[-3000:])
    # not the federation.timeout (3600 s by default) times (1 + max-retries)
    assert seconds < STOP_LIMIT, f"took {seconds:.1f} s to end"
    _assert_nothing_left(proc.pid)
    line = _one_line(stderr, "error: ")
    assert "a ClientApp actor died" in line
    assert line.endswith(f"resume with: fedpeft simulate --resume {out}")


def test_more_cpus_per_client_than_cpus_is_refused_before_the_engine_starts(tmp_path):
    cpus = os.cpu_count() or 1
    cmd = _simulate(tmp_path, "--rounds", "1", "--clients", "2", "--out", str(tmp_path / "run"))
    cmd += ["--set", "model.name=tiny-bert", "--set", "simulation.cpus-per-client=100"]
    started = time.monotonic()
    proc = subprocess.run(
        cmd,
        cwd=tmp_path,
        env=_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=300,
        start_new_session=True,
    )
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    line = _one_line(proc.stderr, "error: ")
    assert "simulation.cpus-per-client (100)" in line
    assert f"the {cpus} CPUs the simulation may use" in line
    assert "ActorPool" not in proc.stderr  # refused before Ray started
    assert time.monotonic() - started < 120


def test_the_server_thread_leaves_a_long_wait_as_soon_as_the_run_stops():
    """The mechanism behind the quick stop: a grid wait of ``federation.timeout`` (an
    hour here) ends at the next poll once the guard stops, instead of at the timeout."""
    import threading

    from flwr.serverapp import Grid

    from fedpeft.flower.engine_guard import EngineGuard, EngineStopped, GuardedGrid

    class SilentGrid(Grid):  # replies never come
        run = None

        def set_run(self, run):
            pass

        def create_message(self, *args, **kwargs):
            raise NotImplementedError

        def get_node_ids(self):
            return [1]

        def push_messages(self, messages):
            return ["m1"]

        def pull_messages(self, message_ids):
            return []

        def send_and_receive(self, messages, *, timeout=None):
            raise NotImplementedError

    guard = EngineGuard(grace=600)
    grid = GuardedGrid(SilentGrid(), guard)
    outcome: list[object] = []

    def server() -> None:
        try:
            grid.send_and_receive(["instruction"], timeout=3600)
            outcome.append("returned")
        except EngineStopped as err:
            outcome.append(err)

    thread = threading.Thread(target=server)
    thread.start()
    time.sleep(0.5)
    assert thread.is_alive() and outcome == []  # still waiting for replies
    started = time.monotonic()
    guard.stop("interrupted by SIGINT", 130, interrupted=True)
    try:
        thread.join(5)
        assert not thread.is_alive(), "the grid wait did not end"
        assert time.monotonic() - started < 1.0
        assert len(outcome) == 1 and isinstance(outcome[0], EngineStopped)
        assert str(outcome[0]) == "interrupted by SIGINT"
        with pytest.raises(EngineStopped):  # and every later grid call
            grid.get_node_ids()
    finally:
        guard.done()  # disarm the watchdog (it would end this process)


def test_the_stop_line_names_the_last_checkpoint_and_the_resume_command(tmp_path):
    from fedpeft.config import parse_run_config
    from fedpeft.flower.simulation import resume_hint

    out = tmp_path / "my run"
    cfg = parse_run_config({"federation.rounds": 5})
    assert resume_hint(cfg, out) == (
        "no round had completed, so there is no checkpoint; run the same command again "
        "to start over"
    )
    (out / "checkpoint").mkdir(parents=True)
    (out / "checkpoint" / "LATEST").write_text("ckpt-000003")
    assert resume_hint(cfg, out) == (
        f"the last complete checkpoint is round 3 of 5 ({out / 'checkpoint' / 'ckpt-000003'}); "
        f"resume with: fedpeft simulate --resume '{out}'"
    )
    never = parse_run_config({"federation.rounds": 5, "checkpoint.every": 0})
    assert resume_hint(never, out).startswith("checkpoint.every is 0, so there is no checkpoint")
