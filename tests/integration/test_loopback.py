"""Ray started by ``fedpeft simulate`` listens on the loopback address only.

Ray has no authentication: a listener on ``0.0.0.0`` or the machine's address is a
code-execution endpoint for anyone on the network. The test runs the real CLI (in its
own session, so its processes are told apart from other Ray runs on the machine) and,
while the ClientApp actors run, samples every listening TCP socket of the run's process
tree, twice: with psutil and with ``ss -ltnp``.
"""

from __future__ import annotations

import ipaddress
import os
import pathlib
import shutil
import subprocess
import sys
import time

import psutil
import pytest

from tests.support.cli_env import cli_env

ROOT = pathlib.Path(__file__).resolve().parents[2]
SETS = [
    "model.name=tiny-bert",
    "data.max-examples=32",
    "data.test-size=100",
    "train.local-steps=4",
    "train.lr=5e-3",
    "faults.slow-rate=1.0",
    "faults.slow-seconds=5",  # round 2 lasts ≥ 5 s: time to sample the listeners
]


def _env(tmp_path: pathlib.Path) -> dict[str, str]:
    env = cli_env(tmp_path / "flwr-home", tmp_path / "fedpeft-cache")
    env.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)  # the run must set it itself
    return env


def is_loopback(ip: str) -> bool:
    """127.0.0.0/8, ::1, or an IPv4-mapped loopback (``::ffff:127.0.0.1``)."""
    addr = ipaddress.ip_address(ip.split("%")[0])
    mapped = getattr(addr, "ipv4_mapped", None)
    return addr.is_loopback or (mapped is not None and mapped.is_loopback)


def tree(pid: int) -> list[psutil.Process]:
    """``pid`` and all its descendants."""
    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


def psutil_listeners(procs: list[psutil.Process]) -> set[tuple[str, str, int]]:
    """``(process name, ip, port)`` of every listening TCP socket of ``procs``."""
    found = set()
    for proc in procs:
        try:
            name = proc.name()
            conns = proc.net_connections(kind="tcp")
        except psutil.Error:
            continue
        for conn in conns:
            if conn.status == psutil.CONN_LISTEN:
                found.add((name, conn.laddr.ip, conn.laddr.port))
    return found


def ss_listeners(pids: set[int]) -> set[tuple[str, str, int]]:
    """The same from ``ss -ltnpH`` (``*`` stands for every address)."""
    out = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, check=True).stdout
    found = set()
    for line in out.splitlines():
        parts = line.split()
        if len(parts) < 6 or "pid=" not in line:
            continue
        local = parts[3]
        ip, port = local.rsplit(":", 1)
        ip = ip.strip("[]")
        for users in line.split("((")[1:]:
            for user in users.split("),("):
                name = user.split('"')[1] if '"' in user else "?"
                pid = int(user.split("pid=")[1].split(",")[0])
                if pid in pids:
                    found.add((name, ip, int(port)))
    return found


@pytest.mark.integration
def test_every_listening_socket_of_a_simulation_is_on_loopback(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "fedpeft.cli", "simulate", "--quiet", "--rounds", "2"]
    cmd += ["--clients", "2", "--out", str(out)] + [a for s in SETS for a in ("--set", s)]
    proc = subprocess.Popen(
        cmd,
        cwd=tmp_path,
        env=_env(tmp_path),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    latest = out / "checkpoint" / "LATEST"
    seen_psutil: set[tuple[str, str, int]] = set()
    seen_ss: set[tuple[str, str, int]] = set()
    samples = 0
    try:
        deadline = time.monotonic() + 420
        while proc.poll() is None and time.monotonic() < deadline:
            if latest.exists():  # round 1 done: Ray, the agents and the actors are all up
                procs = tree(proc.pid)
                seen_psutil |= psutil_listeners(procs)
                if shutil.which("ss"):
                    seen_ss |= ss_listeners({p.pid for p in procs})
                samples += 1
                if samples >= 6:
                    break
            time.sleep(0.5)
        _, err = proc.communicate(timeout=420)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
            proc.communicate()
    assert proc.returncode == 0, err[-3000:]
    assert samples >= 3, "the run ended before its listeners could be sampled"
    names = {name for name, _, _ in seen_psutil}
    # the sample saw the Ray processes that used to listen on every interface
    assert {"gcs_server", "raylet"} <= names, seen_psutil
    assert any(n.startswith("ray::ClientApp") for n in names), seen_psutil
    exposed = sorted(s for s in seen_psutil | seen_ss if s[1] == "*" or not is_loopback(s[1]))
    assert exposed == [], f"listening on a non-loopback address: {exposed}"
