"""deploy.local without a deployment: config rendering, early errors, process cleanup."""

from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from flwr.common.config import parse_config_args

from fedpeft.deploy.certs import generate_certs
from fedpeft.deploy.local import (
    LocalDeployment,
    _descendants,
    app_config_keys,
    default_app_dir,
    deploy_local,
    node_config_arg,
    render_run_config,
)
from fedpeft.errors import ConfigError
from tests.support.procs import alive

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_run_config_file_is_read_back_by_flower_with_types(tmp_path):
    flat = {
        "federation.rounds": 2,
        "train.lr": 5e-3,
        "eval.client": True,
        "output.dir": '/tmp/with space/and "quote"',
        "lora.target-modules": "query,value",
        "seed": 7,
    }
    path = tmp_path / "run-config.toml"
    path.write_text(render_run_config(flat))
    assert parse_config_args([str(path)]) == flat


def test_node_config_string_is_parsed_by_flower():
    arg = node_config_arg(1, 3, {"device.tier": "slow", "device.compute-speed": 0.25})
    assert parse_config_args([arg]) == {
        "partition-id": 1,
        "num-partitions": 3,
        "device.tier": "slow",
        "device.compute-speed": 0.25,
    }


def test_app_dir_is_this_project_and_lists_every_config_key():
    assert default_app_dir() == ROOT
    keys = app_config_keys(ROOT)
    assert {"federation.rounds", "federation.clients", "output.dir", "model.name"} <= keys


def test_keys_flwr_run_cannot_take_fail_before_anything_starts(tmp_path):
    app = tmp_path / "app"
    app.mkdir()
    (app / "pyproject.toml").write_text(
        "[tool.flwr.app]\npublisher = 'x'\n[tool.flwr.app.config]\nfederation.rounds = 1\n"
        "federation.clients = 2\noutput.dir = ''\n"
    )
    started = time.monotonic()
    with pytest.raises(
        ConfigError, match=r"'data.max-examples' is not in \[tool.flwr.app.config\]"
    ):
        deploy_local(
            {"data.max-examples": "8"},
            nodes=2,
            rounds=1,
            out_dir=tmp_path / "r",
            app_dir=app,
            work_dir=tmp_path / "w",
            echo=None,
        )
    assert time.monotonic() - started < 5
    assert not (tmp_path / "w").exists()
    with pytest.raises(ConfigError, match="federation.rounds must be > 0, got 0"):
        deploy_local({}, nodes=2, rounds=0, out_dir=tmp_path / "r", echo=None)
    with pytest.raises(ConfigError, match="node_configs has 1 entries, expected one per node"):
        deploy_local({}, nodes=2, rounds=1, out_dir=tmp_path / "r", node_configs=[{}], echo=None)


def test_stop_ends_the_whole_process_tree(tmp_path):
    certs = generate_certs(tmp_path / "certs", 1)
    with LocalDeployment(certs, tmp_path / "w", ROOT, echo=None, stop_timeout=2.0) as dep:
        # a shell that ignores SIGTERM, with a child in its group and one that left it
        child = dep._spawn(
            "tree", ["sh", "-c", "trap '' TERM; sleep 300 & setsid sleep 300 & wait"], dep.base_env
        )
        deadline = time.monotonic() + 10
        while len(_descendants(child.popen.pid)) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        pids = [child.popen.pid, *_descendants(child.popen.pid)]
        assert len(pids) == 3
    for _ in range(50):
        if not any(alive(p) for p in pids):
            break
        time.sleep(0.1)
    assert not any(alive(p) for p in pids)
    assert dep.children == []


SCRIPT = textwrap.dedent(
    """
    import pathlib, sys, time
    from fedpeft.deploy.certs import generate_certs
    from fedpeft.deploy.local import LocalDeployment, _descendants, _terminate_on_signals
    work = pathlib.Path(sys.argv[1])
    certs = generate_certs(work / "certs", 1)
    with _terminate_on_signals(), LocalDeployment(certs, work, work, echo=None) as dep:
        c = dep._spawn("sleepers", ["sh", "-c", "sleep 300 & sleep 300 & wait"], dep.base_env)
        while len(_descendants(c.popen.pid)) < 2:
            time.sleep(0.05)
        print(c.popen.pid, *_descendants(c.popen.pid), flush=True)
        time.sleep(300)
    """
)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_to_the_driver_stops_every_child(tmp_path, signum):
    # A driver in a terminal's foreground: a background job of a non-interactive shell
    # (e.g. `pytest … &`) inherits SIGINT ignored, and Python then raises no KeyboardInterrupt.
    proc = subprocess.Popen(
        [sys.executable, "-c", SCRIPT, str(tmp_path)],
        stdout=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        pids = [int(p) for p in proc.stdout.readline().split()]
        assert len(pids) == 3 and all(alive(p) for p in pids)
        os.kill(proc.pid, signum)
        assert proc.wait(timeout=30) != 0
    finally:
        if proc.poll() is None:
            proc.kill()
    deadline = time.monotonic() + 10  # a loaded machine reaps children slowly
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(alive(p) for p in pids)
