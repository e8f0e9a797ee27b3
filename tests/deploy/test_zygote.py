"""The warm ClientApp zygote: shim fallback, fork protocol, crash isolation, cleanup,
fork safety of torch, warm state only for the same FAB and run, same results warm/cold."""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from fedpeft.deploy import zygote
from fedpeft.flower import warm_clientapp
from tests.support.procs import TINY_DEPLOY, alive, processes_with_env

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _fake_real(directory: pathlib.Path) -> pathlib.Path:
    """A stand-in for Flower's flwr-clientapp: prints its argv, exits 7."""
    path = directory / "flwr-clientapp"
    directory.mkdir(parents=True, exist_ok=True)
    body = "import sys, json\nprint(json.dumps({'real': sys.argv[1:]}))\nsys.exit(7)\n"
    path.write_text(f"#!{sys.executable}\n{body}")
    path.chmod(0o755)
    return path


@pytest.fixture()
def shim_env(tmp_path):
    shim = zygote.install_shim(tmp_path / "shim")
    _fake_real(tmp_path / "real")
    dirs = [str(tmp_path / "shim"), str(tmp_path / "real"), os.environ["PATH"]]
    env = {**os.environ, "PATH": os.pathsep.join(dirs), "ZT_X": "1"}
    env.pop(zygote.SOCKET_ENV, None)
    return shim, env


@pytest.fixture()
def test_zygote(tmp_path, shim_env):
    """A zygote whose children run tests/deploy/zygote_child.py:echo (no preload)."""
    _, env = shim_env
    sock = tmp_path / "z.sock"
    env = {**env, zygote.SOCKET_ENV: str(sock)}
    log = (tmp_path / "zygote.log").open("wb")
    proc = subprocess.Popen(
        [
            *zygote.command(sock),
            "--preload",
            "",
            "--child",
            "tests.deploy.zygote_child:echo",
            "--warm",
            "tests.deploy.zygote_child:warm",
            "--kill-timeout",
            "2",
        ],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    assert zygote.wait_ready(sock, 60, alive=lambda: proc.poll() is None), (
        tmp_path / "zygote.log"
    ).read_text()
    yield proc, sock, env
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    log.close()


def _run_shim(shim, env, *args, cwd=None, timeout=60):
    return subprocess.run(
        [str(shim), *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout
    )


def test_the_shim_runs_the_real_clientapp_when_no_zygote_answers(tmp_path, shim_env):
    shim, env = shim_env
    for extra in ({}, {zygote.SOCKET_ENV: str(tmp_path / "nobody.sock")}):
        out = _run_shim(shim, {**env, **extra}, "--token", "t")
        assert out.returncode == 7, out.stderr
        assert json.loads(out.stdout) == {"real": ["--token", "t"]}


def test_the_shim_source_imports_only_the_standard_library():
    source = (ROOT / "fedpeft" / "deploy" / "zygote_shim.py").read_text()
    imports = {
        line.split()[1] for line in source.splitlines() if line.startswith(("import ", "from "))
    }
    assert imports <= {"json", "os", "signal", "socket", "sys", "time"}


def test_a_forked_child_gets_argv_env_cwd_descriptors_and_its_exit_code(
    tmp_path, shim_env, test_zygote
):
    shim, _ = shim_env
    proc, sock, env = test_zygote
    out = _run_shim(shim, env, "--token", "abc", "3", cwd=tmp_path)
    assert out.returncode == 3, out.stderr
    got = json.loads(out.stdout)
    assert got["argv"] == ["--token", "abc", "3"]
    assert got["cwd"] == str(tmp_path) and got["x"] == "1"
    assert got["ppid"] == proc.pid  # forked by the zygote
    assert "to stderr" in out.stderr


def test_a_request_with_another_environment_runs_the_real_clientapp(shim_env, test_zygote):
    shim, _ = shim_env
    _, _, env = test_zygote
    out = _run_shim(shim, {**env, "ZT_X": "2"}, "x")
    assert out.returncode == 7 and json.loads(out.stdout) == {"real": ["x"]}


def test_a_crashing_child_does_not_kill_the_zygote(shim_env, test_zygote):
    shim, _ = shim_env
    proc, sock, env = test_zygote
    crashed = _run_shim(shim, env, "crash")
    assert crashed.returncode == -signal.SIGABRT  # the shim ends as its child did
    assert proc.poll() is None
    again = _run_shim(shim, env, "0")
    assert again.returncode == 0 and json.loads(again.stdout)["argv"] == ["0"]
    status = zygote.ping(sock)
    assert status["children"] == [] and status["forks"] == 2


def test_signals_reach_the_child_and_a_killed_shim_takes_its_child_along(shim_env, test_zygote):
    shim, _ = shim_env
    _, sock, env = test_zygote
    for how in (signal.SIGTERM, signal.SIGKILL):
        run = subprocess.Popen([str(shim), "sleep"], env=env, stdout=subprocess.PIPE, text=True)
        child = json.loads(run.stdout.readline())["pid"]
        assert alive(child)
        run.send_signal(how)
        run.wait(timeout=30)
        deadline = time.monotonic() + 10
        while alive(child) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not alive(child), how
        if how == signal.SIGTERM:
            assert run.returncode == -signal.SIGTERM
    time.sleep(0.2)
    assert zygote.ping(sock)["children"] == []


def test_warm_requests_run_in_the_zygote_and_reach_later_children(shim_env, test_zygote):
    shim, _ = shim_env
    _, sock, env = test_zygote
    import socket as so

    for request, ok in (({"n": 1}, True), ({"fail": True}, False)):
        with so.socket(so.AF_UNIX, so.SOCK_SEQPACKET) as s:
            s.connect(str(sock))
            zygote.send(s, {"op": "warm", "request": request})
            assert zygote.receive(s)[0] == {"ok": ok}
    assert json.loads(_run_shim(shim, env, "0").stdout)["warmed"] == [{"n": 1}]
    assert zygote.ping(sock)["warm"] == 1  # a failed warm keeps the zygote and its state


def test_stopping_the_zygote_stops_its_children_and_removes_the_socket(shim_env, test_zygote):
    shim, _ = shim_env
    proc, sock, env = test_zygote
    run = subprocess.Popen([str(shim), "sleep"], env=env, stdout=subprocess.PIPE, text=True)
    child = json.loads(run.stdout.readline())["pid"]
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0
    assert not alive(child) and not sock.exists()
    assert run.wait(timeout=10) == -signal.SIGTERM


def test_a_forked_child_trains_with_two_threads_exactly_like_a_fresh_process(tmp_path, shim_env):
    """torch's CPU wheel uses GNU libgomp (not fork-safe once its pool exists): the
    zygote pins one thread before any torch op; the child may then use two."""
    shim, env = shim_env
    sock = tmp_path / "t.sock"
    env = {**env, zygote.SOCKET_ENV: str(sock), "OMP_NUM_THREADS": "2"}
    proc = subprocess.Popen(
        [*zygote.command(sock), "--child", "tests.deploy.zygote_child:train", "--warm", ""],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        assert zygote.wait_ready(sock, 120, alive=lambda: proc.poll() is None)
        assert zygote.ping(sock)["python_threads"] == 1
        warm = [json.loads(_run_shim(shim, env, cwd=ROOT).stdout) for _ in range(2)]
        fresh = json.loads(
            subprocess.run(
                [sys.executable, "tests/deploy/zygote_child.py"],
                cwd=ROOT,
                env=env,
                capture_output=True,
                text=True,
                check=True,
            ).stdout
        )
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    assert warm[0]["threads"] == warm[1]["threads"] == fresh["threads"] == 2
    assert warm[0]["loss"] == warm[1]["loss"] == fresh["loss"]
    assert warm[0]["os_threads"] >= 2  # the child really started an OpenMP pool


def test_socket_paths_stay_within_the_unix_limit(tmp_path):
    long_dir = tmp_path / ("d" * 120)
    assert len(str(zygote.socket_path(long_dir, "zygote-supernode-1"))) <= 107
    assert zygote.socket_path("/tmp", "z") == pathlib.Path("/tmp/z.sock")


def test_env_difference_allows_what_imports_set_on_both_sides():
    start, now = {"A": "1"}, {"A": "1", "GRPC_VERBOSITY": "ERROR"}
    assert zygote.env_difference(start, {"A": "1", "GRPC_VERBOSITY": "ERROR"}, now) == []
    assert zygote.env_difference(start, {"A": "1"}, now) == []
    assert zygote.env_difference(start, {"A": "2"}, now) == ["A"]
    assert zygote.env_difference(start, {"A": "1", "HF_HUB_OFFLINE": "0"}, now) == [
        "HF_HUB_OFFLINE"
    ]


# -- warm state: the same FAB and run only ------------------------------------------


def _fake_project(root: pathlib.Path, name: str, marker: str) -> pathlib.Path:
    project = root / "apps" / name
    pkg = project / "zyapp"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(f"MARKER = {marker!r}\nBUILT = []\n")
    (pkg / "client.py").write_text(
        textwrap.dedent("""
        from zyapp import BUILT

        def warm(hint):
            BUILT.append(hint)
    """)
    )
    (project / "pyproject.toml").write_text(
        '[tool.flwr.app.components]\nclientapp = "zyapp.client:app"\n'
    )
    return project


def test_warm_imports_the_app_from_its_fab_and_forgets_it_for_another_run(tmp_path, monkeypatch):
    sibling = tmp_path / "apps" / "site-packages"  # a path beside the FAB dirs must stay
    monkeypatch.setattr(sys, "path", [*sys.path, str(sibling)])
    before = list(sys.path)
    monkeypatch.setattr(
        warm_clientapp,
        "_STATE",
        {**warm_clientapp._STATE, "project": None, "run_id": None, "hints": [], "paths": []},
    )
    one, two = _fake_project(tmp_path, "a.one", "one"), _fake_project(tmp_path, "a.two", "two")
    try:
        warm_clientapp.warm({"project": str(one), "run_id": 1, "hint": {"r": 8}})
        first = sys.modules["zyapp"]
        assert first.MARKER == "one" and first.BUILT == [{"r": 8}]
        warm_clientapp.warm({"project": str(one), "run_id": 1, "hint": {"r": 8}})  # already warm
        warm_clientapp.warm({"project": str(one), "run_id": 1, "hint": {"r": 4}})
        assert sys.modules["zyapp"] is first and first.BUILT == [{"r": 8}, {"r": 4}]
        # a new run of the same FAB starts from a fresh import (nothing carried over)
        warm_clientapp.warm({"project": str(one), "run_id": 2, "hint": {"r": 8}})
        assert sys.modules["zyapp"] is not first and sys.modules["zyapp"].BUILT == [{"r": 8}]
        # another FAB: its own code, and the other FAB directory leaves sys.path
        warm_clientapp.warm({"project": str(two), "run_id": 2, "hint": {"r": 8}})
        assert sys.modules["zyapp"].MARKER == "two" and str(one) not in sys.path
        assert sys.path == [str(two), *before]
        # what a child does for a message of another run: drop the warmed modules
        warm_clientapp.use_project(two, keep=False)
        assert "zyapp" not in sys.modules
    finally:
        warm_clientapp.forget_modules({"zyapp"})


def test_the_client_warm_hook_fills_exactly_the_cache_the_handlers_read(monkeypatch):
    from fedpeft.config import parse_run_config
    from fedpeft.flower import client_app
    from fedpeft.tasks import get_task
    from fedpeft.tasks import model as task_model

    task_model.clear_cache()
    run_config = {
        "model.name": "tiny-bert",
        "data.max-examples": 16,
        "data.test-size": 50,
        "seed": 3,
    }
    node_config = {"partition-id": 1, "num-partitions": 2}
    client_app.warm({"run_config": run_config, "node_config": node_config, "rank": None})
    loads = dict(task_model.LOADS)
    assert loads  # it built something
    task = get_task(client_app._config_of(run_config, node_config, {}))
    task.model(parse_run_config(run_config).lora.r)
    task.client_data(1, 2)
    assert dict(task_model.LOADS) == loads  # the handlers' lookups hit the warmed cache
    other = get_task(client_app._config_of({**run_config, "seed": 4}, node_config, {}))
    other.model(8)
    assert dict(task_model.LOADS) != loads  # another config: built afresh, never the warm one
    task_model.clear_cache()


# -- a real deployment, warm and cold ---------------------------------------------------



@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from fedpeft.deploy.local import deploy_local

    base = tmp_path_factory.mktemp("warm")
    out = {}
    for name, warm, isolation in (
        ("cold", False, "subprocess"),
        ("warm", True, "subprocess"),
        ("warm-process", True, "process"),
    ):
        started = time.perf_counter()
        deploy_local(
            TINY_DEPLOY,
            nodes=2,
            rounds=2,
            out_dir=base / name / "run",
            work_dir=base / name / "work",
            isolation=isolation,
            warm=warm,
            echo=None,
            run_timeout=1200,
            env={warm_clientapp.TIMINGS_ENV: str(base / name / "timings.jsonl")},
        )
        out[name] = (base / name, time.perf_counter() - started)
    return out


@pytest.mark.integration
def test_warm_deployments_give_the_same_results_as_cold_ones(runs):
    rounds = {
        name: json.loads((path / "run" / "summary.json").read_text())["rounds"]
        for name, (path, _) in runs.items()
    }
    for name in ("warm", "warm-process"):
        for cold, warm in zip(rounds["cold"], rounds[name], strict=True):
            assert warm["loss"] == cold["loss"] and warm["accuracy"] == cold["accuracy"], name
            if cold["round"] > 0:
                assert warm["train_loss"] == cold["train_loss"]
                assert warm["uplink_bytes"] == cold["uplink_bytes"]


@pytest.mark.integration
def test_warm_clientapps_came_from_the_zygote_and_reused_its_task(runs):
    for name in ("warm", "warm-process"):
        path, _ = runs[name]
        events = [json.loads(line) for line in (path / "timings.jsonl").read_text().splitlines()]
        loads = [e for e in events if e["event"] == "app-loaded"]
        assert loads and all(e.get("reused") is not None for e in loads)
        # the run's first message (query.hello) is cold; every train message reused the task
        trains = {e["pid"] for e in events if e.get("message_type") == "train"}
        assert trains and all(e["reused"] for e in loads if e["pid"] in trains), name
        logs = (path / "work" / "logs").glob("zygote-*.log")
        assert all("refused" not in log.read_text() for log in logs)
    cold, _ = runs["cold"]
    events = [json.loads(line) for line in (cold / "timings.jsonl").read_text().splitlines()]
    assert not any(e["event"] == "app-loaded" for e in events)  # no zygote in a cold run


@pytest.mark.integration
def test_every_started_process_was_stopped_including_zygotes(runs):
    for path, _ in runs.values():
        work = path / "work"
        assert (work / "logs" / "superlink.log").exists()
        assert processes_with_env(f"FLWR_HOME={work}") == []
    assert not list((runs["warm"][0] / "work").glob("*.sock"))
