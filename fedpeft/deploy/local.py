"""A real deployment on loopback: SuperLink, SuperNodes, TLS and node authentication.

:func:`deploy_local` starts the topology of ``docker-compose.yml`` as processes on
127.0.0.1, runs the app with ``flwr run … --stream`` and stops everything it started:

1. ``flower-superlink`` with ``--ssl-ca-certfile/--ssl-certfile/--ssl-keyfile``,
   ``--enable-supernode-auth``, ``--disable-runtime-dependency-installation``, a free
   port and a state database in the work directory;
2. ``flwr supernode register <pub> fedpeft-local`` for every node, through a
   temporary ``FLWR_HOME/config.toml`` connection with ``root-certificates``;
3. one ``flower-supernode`` per node with ``--root-certificates``,
   ``--auth-supernode-private-key``, its own Runtime-API port (with TLS) and
   ``--node-config "partition-id=i num-partitions=N …"``;
4. ``flwr run <app> fedpeft-local --stream -c run-config.toml``; the ServerApp
   writes ``summary.json`` etc. to ``output.dir``.

Isolation: ``subprocess`` (default) — the SuperLink and each SuperNode spawn the
ServerApp / one ClientApp process per message themselves, as in FLOWER.md §9.1.
``process`` starts the three SuperExecs the compose file runs (one for ServerApps,
one per SuperNode), connected over TLS and authenticated with the SuperExec shared
secrets — the compose layout, exactly, on loopback.

Warm ClientApps (``warm=True``, the default of :func:`deploy_local`): Flower starts a
new ``flwr-clientapp`` process per message; a zygote per node
(:mod:`fedpeft.deploy.zygote`) forks them instead, with the imports done and, after a
run's first message, the model and data built. Its ``flwr-clientapp`` shim is first on
the ``PATH`` of the node's launcher (the SuperNode, or its SuperExec in ``process``
isolation); without an answering zygote the shim runs Flower's own.

Every child runs in its own session; :meth:`LocalDeployment.stop` sends SIGTERM to
each child's process group, SIGKILL after ``stop_timeout`` seconds, then SIGKILL to
any descendant still alive — on success, on failure, on Ctrl-C and on SIGTERM.
Only processes this module started (and their children) are ever signalled.

:meth:`LocalDeployment.kill_supernode` crashes one SuperNode mid-run (SIGKILL, as a
power cut would) and :meth:`LocalDeployment.restart_supernode` starts it again with the
same key, node config and ports (reconnection tests, ``tests/deploy/test_reconnect.py``);
:meth:`LocalDeployment.kill_superlink` / :meth:`LocalDeployment.restart_superlink` do the
same to the SuperLink (same port, certificates and state database) and
:meth:`LocalDeployment.resume` continues the interrupted run from its checkpoint
(``tests/deploy/test_superlink_restart.py``).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import pathlib
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import IO, Any

from fedpeft.config import FlatConfig, parse_run_config
from fedpeft.deploy import zygote
from fedpeft.deploy.certs import CertManifest, NodeFiles, generate_certs, load_manifest
from fedpeft.errors import ConfigError, FedPeftError
from fedpeft.types import Scalar

CONNECTION = "fedpeft-local"
ISOLATIONS = ("subprocess", "process")
EXIT_SUPERNODE_CONNECTION_ERROR = 305
"""Exit code of a SuperNode the SuperLink refused (FLOWER.md §9.3)."""

_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
}


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def toml_value(value: Scalar) -> str:
    """A scalar as a TOML value (strings as basic strings)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    return json.dumps(str(value))


def render_run_config(flat: Mapping[str, Scalar]) -> str:
    """Flat dotted keys as a TOML document (each key segment quoted)."""
    lines = []
    for key, value in flat.items():
        dotted = ".".join(json.dumps(part) for part in key.split("."))
        lines.append(f"{dotted} = {toml_value(value)}")
    return "\n".join(lines) + "\n"


def node_config_arg(partition_id: int, num_partitions: int, extra: Mapping[str, Scalar]) -> str:
    """The ``--node-config`` string: partition keys first, then ``extra`` (e.g. ``device.tier``)."""
    items: dict[str, Scalar] = {"partition-id": partition_id, "num-partitions": num_partitions}
    items.update(extra)
    return " ".join(f"{k}={toml_value(v)}" for k, v in items.items())


def app_config_keys(app_dir: pathlib.Path) -> set[str]:
    """The flat keys of ``[tool.flwr.app.config]`` (the only ones ``flwr run -c`` accepts)."""
    with (app_dir / "pyproject.toml").open("rb") as handle:
        data = tomllib.load(handle)
    config = data.get("tool", {}).get("flwr", {}).get("app", {}).get("config", {})

    def walk(table: Mapping[str, Any], prefix: str) -> Iterator[str]:
        for key, value in table.items():
            if isinstance(value, Mapping):
                yield from walk(value, f"{prefix}{key}.")
            else:
                yield f"{prefix}{key}"

    return set(walk(config, ""))


def default_app_dir() -> pathlib.Path:
    """The project directory (``pyproject.toml`` with ``[tool.flwr.app]``) of this package.

    Raises:
        FedPeftError: fedpeft is not installed from its source tree.
    """
    root = pathlib.Path(__file__).resolve().parents[2]
    pyproject = root / "pyproject.toml"
    if pyproject.exists() and "[tool.flwr.app]" in pyproject.read_text():
        return root
    raise FedPeftError(
        f"deploy-local needs the fedpeft project directory (a pyproject.toml with "
        f"[tool.flwr.app]); none at {root} — install fedpeft editable (pip install -e .) "
        "or pass app_dir"
    )


@dataclass
class _Child:
    """One started process, its log and its role."""

    name: str
    popen: subprocess.Popen[bytes]
    log_path: pathlib.Path
    daemon: bool = True  # expected to keep running until stop()
    descendants: set[int] = field(default_factory=set)


@dataclass
class _Node:
    """A started SuperNode: what it takes to start it again, and its processes."""

    node: NodeFiles
    port: int  # its Runtime API
    cmd: list[str]
    env: dict[str, str]
    superexec_cmd: list[str] | None  # ``process`` isolation: its SuperExec
    superexec_env: dict[str, str] | None
    children: list[_Child] = field(default_factory=list)


def _children_of(pid: int) -> set[int]:
    """PIDs whose parent is ``pid`` (Linux /proc; empty elsewhere)."""
    out = set()
    for entry in pathlib.Path("/proc").glob("[0-9]*"):
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[-1].split()
        if len(fields) > 1 and int(fields[1]) == pid:
            out.add(int(entry.name))
    return out


def _descendants(pid: int) -> set[int]:
    found: set[int] = set()
    frontier = [pid]
    while frontier:
        for child in _children_of(frontier.pop()):
            if child not in found:
                found.add(child)
                frontier.append(child)
    return found


def _exited(pid: int) -> bool:
    """Whether child ``pid`` has exited, without reaping it (its PID stays reserved)."""
    try:
        info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return True
    return info is not None


def tail(path: pathlib.Path, lines: int = 25) -> str:
    """The last ``lines`` lines of a log file."""
    if not path.exists():
        return ""
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


class LocalDeployment:
    """Flower deployment processes on 127.0.0.1 with TLS and SuperNode authentication.

    Use as a context manager (``stop()`` runs on exit). ``start_superlink`` first,
    then ``register`` / ``start_supernode`` per node, then ``run``.

    Args:
        certs: the certificate manifest (:func:`fedpeft.deploy.certs.generate_certs`).
        work_dir: logs, state database, ``FLWR_HOME`` of every process, run config.
        app_dir: the Flower app (``flwr run`` argument).
        isolation: ``subprocess`` or ``process`` (see the module docstring).
        env: extra environment for every process.
        echo: where progress lines go (``print`` by default; ``None`` for silence).
        startup_timeout: seconds to wait for a process to become ready.
        stop_timeout: seconds between SIGTERM and SIGKILL.
        warm: start each node's ClientApps from a warm zygote (see
            :mod:`fedpeft.deploy.zygote`): one zygote per node, with the environment of
            the process that launches its ClientApps, and the ``flwr-clientapp`` shim
            first on that process's ``PATH``.
    """

    def __init__(
        self,
        certs: CertManifest,
        work_dir: pathlib.Path,
        app_dir: pathlib.Path,
        isolation: str = "subprocess",
        env: Mapping[str, str] | None = None,
        echo: Callable[[str], None] | None = print,
        startup_timeout: float = 90.0,
        stop_timeout: float = 10.0,
        warm: bool = False,
    ) -> None:
        if isolation not in ISOLATIONS:
            raise ConfigError(
                f"isolation must be one of {', '.join(ISOLATIONS)}, got {isolation!r}"
            )
        self.certs = certs
        self.work_dir = work_dir.resolve()
        self.app_dir = app_dir.resolve()
        self.isolation = isolation
        self.echo = echo or (lambda line: None)
        self.startup_timeout = startup_timeout
        self.stop_timeout = stop_timeout
        self.warm = warm
        self.zygotes: dict[str, pathlib.Path] = {}  # node name -> socket
        self.logs = self.work_dir / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.children: list[_Child] = []
        self.node_ids: dict[str, int] = {}
        self.supernodes: dict[str, _Node] = {}
        self._lock = threading.Lock()  # run()'s liveness check vs. kill_supernode()
        bin_dir = str(pathlib.Path(sys.executable).parent)
        base = {**os.environ, **_ENV, **(env or {})}
        base["PATH"] = f"{bin_dir}{os.pathsep}{base.get('PATH', '')}"
        self.base_env = base
        self.cli_home = self._home("cli")
        (self.cli_home / "config.toml").write_text(
            "[superlink]\n"
            f'default = "{CONNECTION}"\n\n'
            f"[superlink.{CONNECTION}]\n"
            f'address = "{self.address}"\n'
            f"root-certificates = {json.dumps(str(certs.path(certs.ca_cert)))}\n"
        )

    # -- context manager ------------------------------------------------------------
    def __enter__(self) -> LocalDeployment:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- processes ------------------------------------------------------------------
    def _home(self, name: str) -> pathlib.Path:
        path = self.work_dir / "home" / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def _env(self, home: str, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        return {**self.base_env, "FLWR_HOME": str(self._home(home)), **(extra or {})}

    def _spawn(
        self, name: str, cmd: Sequence[str], env: Mapping[str, str], daemon: bool = True
    ) -> _Child:
        log_path = self.logs / f"{name}.log"
        with log_path.open("ab") as log:
            popen = subprocess.Popen(
                list(cmd),
                cwd=self.work_dir,
                env=dict(env),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # our own process group: stopped as a unit
            )
        child = _Child(name, popen, log_path, daemon)
        self.children.append(child)
        return child

    def _cli(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["flwr", *args],
            cwd=self.work_dir,
            env=self._env("cli"),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def _server_tls(self, cert: str, key: str) -> list[str]:
        c = self.certs
        return [
            "--ssl-ca-certfile",
            str(c.path(c.ca_cert)),
            "--ssl-certfile",
            str(c.path(cert)),
            "--ssl-keyfile",
            str(c.path(key)),
        ]

    def _check_alive(self, child: _Child, what: str) -> None:
        code = child.popen.poll()
        if code is not None:
            raise FedPeftError(
                f"{child.name} exited with code {code} while {what}; its log "
                f"({child.log_path}) ends with:\n{tail(child.log_path)}"
            )

    def _wait_port(self, child: _Child, port: int) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            self._check_alive(child, f"starting (port {port})")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
                return
            time.sleep(0.2)
        raise FedPeftError(
            f"{child.name} did not listen on port {port} within {self.startup_timeout:.0f} s"
        )

    def start_superlink(self) -> None:
        """Start the SuperLink (and, in ``process`` isolation, the ServerApp SuperExec)."""
        c = self.certs
        cmd = [
            "flower-superlink",
            *self._server_tls(c.server_cert, c.server_key),
            "--enable-supernode-auth",
            "--disable-runtime-dependency-installation",
            "--isolation",
            self.isolation,
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--database",
            str(self.work_dir / "state.db"),
        ]
        if self.isolation == "process":
            cmd += ["--superexec-auth-secret-file", str(c.path(c.superexec_secret))]
        self._link_cmd = cmd
        self._start_link()

    def _start_link(self, superexec: bool = True) -> _Child:
        link = self._spawn("superlink", self._link_cmd, self._env("superlink"))
        self._wait_port(link, self.port)
        self.echo(f"superlink listening on {self.address} (TLS, node authentication on)")
        if self.isolation == "process" and superexec:
            self._spawn(
                "superexec-serverapp",
                self._superexec_cmd(self.port, self.certs.superexec_secret),
                self._env("superexec-serverapp"),
            )
        return link

    def _kill(self, victims: Sequence[_Child]) -> None:
        """SIGKILL each child's process group, then every descendant it had."""
        with self._lock:
            for child in victims:
                child.daemon = False
        for child in reversed(victims):
            if child.popen.returncode is None:
                child.descendants = _descendants(child.popen.pid)
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(child.popen.pid, signal.SIGKILL)
                child.popen.wait()
            for pid in child.descendants:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
        with self._lock:
            self.children = [c for c in self.children if c not in victims]

    def kill_superlink(self, superexec: bool = True) -> None:
        """Crash the SuperLink: SIGKILL to its process group and every descendant (in
        ``subprocess`` isolation its SuperExec and the running ServerApp).

        What Flower 1.41 keeps is what ``--database`` (``state.db`` in the work
        directory) holds: registered node keys and ids, runs and their status. The
        ServerApp process is gone with its round in progress; ``flwr run --stream``
        exits with code 1 ("Connection to the SuperLink is unavailable"); the SuperNodes
        keep retrying and reconnect after the restart. The database lists the run as
        running until its task token expires (2 x 30 s), then ``finished:failed``.
        :meth:`run` does not count the killed SuperLink as a failure.
        Start it again with :meth:`restart_superlink`, then resume the run from its
        checkpoint (:meth:`resume`).

        Args:
            superexec: in ``process`` isolation, also kill the ServerApp SuperExec
                (``False`` leaves it running, as when only the SuperLink's container
                crashes in the compose layout).
        """
        names = ["superlink"] + (["superexec-serverapp"] if superexec else [])
        victims = [c for c in self.children if c.name in names and c.popen.returncode is None]
        if not any(c.name == "superlink" for c in victims):
            raise FedPeftError("kill_superlink: no SuperLink is running")
        self._kill(victims)
        also = " and its SuperExec" if len(victims) > 1 else ""
        self.echo(f"killed the superlink{also} (SIGKILL)")

    def restart_superlink(self) -> _Child:
        """Start the SuperLink again with the same command: same port, certificates,
        node authentication and state database (and the ServerApp SuperExec in
        ``process`` isolation unless it survived). The SuperNodes reconnect on their
        own (:meth:`wait_online`).

        Raises:
            FedPeftError: :meth:`start_superlink` was not called, the SuperLink still
                runs, or it did not come up.
        """
        if not hasattr(self, "_link_cmd"):
            raise FedPeftError("restart_superlink: the SuperLink was never started")
        if any(c.name == "superlink" and c.popen.poll() is None for c in self.children):
            raise FedPeftError("restart_superlink: the SuperLink still runs; kill_superlink first")
        survivor = any(
            c.name == "superexec-serverapp" and c.popen.poll() is None for c in self.children
        )
        return self._start_link(superexec=not survivor)

    def _superexec_cmd(self, port: int, secret: str) -> list[str]:
        c = self.certs
        return [
            "flower-superexec",
            "--runtime-api-address",
            f"127.0.0.1:{port}",
            "--root-certificates",
            str(c.path(c.ca_cert)),
            "--superexec-auth-secret-file",
            str(c.path(secret)),
        ]

    def register(self, node: NodeFiles) -> int:
        """Register ``node``'s public key with the SuperLink; return its node id.

        Retries while the SuperLink is still starting up.
        """
        pub = str(self.certs.path(node.public_key))
        deadline = time.monotonic() + self.startup_timeout
        while True:
            proc = self._cli(
                "supernode", "register", pub, CONNECTION, "--name", node.name, "--format", "json"
            )
            if proc.returncode == 0:
                node_id = _node_id(proc.stdout)
                self.node_ids[node.name] = node_id
                self.echo(f"registered {node.name} (node id {node_id})")
                return node_id
            if "already in use" in proc.stdout + proc.stderr or time.monotonic() > deadline:
                raise FedPeftError(
                    f"`flwr supernode register {pub}` failed (code {proc.returncode}):\n"
                    f"{proc.stdout[-2000:]}{proc.stderr[-2000:]}"
                )
            time.sleep(1.0)

    def start_supernode(
        self,
        node: NodeFiles,
        num_partitions: int,
        node_config: Mapping[str, Scalar] | None = None,
        private_key: pathlib.Path | None = None,
        threads: int | None = None,
        max_retries: int | None = None,
    ) -> _Child:
        """Start one SuperNode (and its SuperExec in ``process`` isolation).

        Args:
            node: the node's files; ``partition-id`` is ``node.partition_id``.
            num_partitions: ``num-partitions`` in its node config.
            node_config: extra node-config entries (``device.tier`` …).
            private_key: authentication key to use instead of the node's own (tests
                use an unregistered key).
            threads: ``OMP_NUM_THREADS`` of its ClientApp processes.
            max_retries: SuperNode ``--max-retries`` (None: Flower's default, unlimited).
        """
        c = self.certs
        port = free_port()
        cmd = [
            "flower-supernode",
            "--superlink",
            self.address,
            "--root-certificates",
            str(c.path(c.ca_cert)),
            "--auth-supernode-private-key",
            str(private_key or c.path(node.private_key)),
            "--isolation",
            self.isolation,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            *self._server_tls(node.runtime_cert, node.runtime_key),
            "--node-config",
            node_config_arg(node.partition_id, num_partitions, node_config or {}),
        ]
        if max_retries is not None:
            cmd += ["--max-retries", str(max_retries)]
        if self.isolation == "process":
            cmd += ["--superexec-auth-secret-file", str(c.path(node.superexec_secret))]
        extra = {"OMP_NUM_THREADS": str(threads)} if threads else {}
        process = self.isolation == "process"
        spec = _Node(
            node,
            port,
            cmd,
            self._env(node.name, extra),
            self._superexec_cmd(port, node.superexec_secret) if process else None,
            self._env(f"superexec-{node.name}", extra) if process else None,
        )
        if self.warm:
            self._start_zygote(spec)
        self.supernodes[node.name] = spec
        return self._launch(spec)

    def _start_zygote(self, spec: _Node) -> None:
        """Start ``spec``'s zygote with the environment of its ClientApps' launcher (the
        SuperNode, or its SuperExec in ``process`` isolation), then give that launcher
        the shim first on ``PATH`` and the zygote's socket. Not waited for: until it
        answers, the shim runs the real ``flwr-clientapp`` (see :meth:`wait_zygotes`)."""
        bin_dir = self.work_dir / "bin"
        zygote.install_shim(bin_dir)
        sock = zygote.socket_path(self.work_dir, f"zygote-{spec.node.name}")
        if spec.superexec_env is not None:
            spec.superexec_env = zygote.launcher_env(spec.superexec_env, bin_dir, sock)
            env = spec.superexec_env
        else:
            spec.env = zygote.launcher_env(spec.env, bin_dir, sock)
            env = spec.env
        self._spawn(f"zygote-{spec.node.name}", zygote.command(sock), env, daemon=False)
        self.zygotes[spec.node.name] = sock

    def wait_zygotes(self, timeout: float | None = None) -> int:
        """Wait until every zygote answers (at most ``timeout`` s, default
        ``startup_timeout``); return how many do. A zygote that is not ready only
        means cold ClientApps."""
        deadline = time.monotonic() + (self.startup_timeout if timeout is None else timeout)
        ready = 0
        for name, sock in self.zygotes.items():
            proc = next(c.popen for c in self.children if c.name == f"zygote-{name}")
            left = max(0.0, deadline - time.monotonic())
            if zygote.wait_ready(sock, left, alive=lambda p=proc: p.poll() is None):
                ready += 1
            else:
                self.echo(f"the zygote of {name} is not ready; its ClientApps start cold")
        return ready

    def _launch(self, spec: _Node) -> _Child:
        """Start ``spec``'s SuperNode (and its SuperExec unless it still runs); return
        the SuperNode."""
        child = self._spawn(spec.node.name, spec.cmd, spec.env)
        survivors = [c for c in spec.children[1:] if c.popen.poll() is None]
        spec.children = [child, *survivors]
        if spec.superexec_cmd is not None and spec.superexec_env is not None and not survivors:
            self._wait_port(child, spec.port)
            spec.children.append(
                self._spawn(
                    f"superexec-clientapp-{spec.node.partition_id + 1}",
                    spec.superexec_cmd,
                    spec.superexec_env,
                )
            )
        return child

    def kill_supernode(self, name: str, superexec: bool = True) -> None:
        """Crash SuperNode ``name``: SIGKILL to its process group, its SuperExec's
        (``process`` isolation) and every descendant (the ClientApp processes).

        Nothing is told to the SuperLink, exactly as after a power cut: it keeps the
        node online until two heartbeat intervals (2 × 30 s in Flower 1.41) pass
        without a heartbeat, then answers the node's pending messages with a "Node
        Unavailable" error. :meth:`run` does not count the killed processes as
        failures. Start the node again with :meth:`restart_supernode`.

        Args:
            name: the node's name (``supernode-<i>``).
            superexec: also kill its SuperExec; ``False`` leaves it running, as when
                only the SuperNode's container crashes in the compose layout (the
                SuperExec retries the SuperNode's Runtime API, at most 20 s apart).

        Raises:
            KeyError: no SuperNode ``name`` was started.
        """
        spec = self.supernodes[name]
        victims = spec.children if superexec else spec.children[:1]
        self._kill(victims)
        self.echo(f"killed {name}{' and its SuperExec' if len(victims) > 1 else ''} (SIGKILL)")

    def restart_supernode(self, name: str, offline_timeout: float = 120.0) -> _Child:
        """Start SuperNode ``name`` again: same key, node config, Runtime-API port and
        SuperExec (started again unless it survived); kill it first if it still runs.

        Flower 1.41 activates a node only if the SuperLink has it as registered or
        offline; a SuperNode started while its predecessor still counts as online (up
        to 2 × 30 s after a crash) is refused — ``Exit Code: 305 … Failed to activate
        SuperNode`` (HTTP 412, not retried), the same message as for an unknown key.
        So this waits until ``flwr supernode list`` no longer shows the node online
        (for a node registered through :meth:`register`; any other starts at once).

        Args:
            name: the node's name (``supernode-<i>``).
            offline_timeout: seconds to wait for the SuperLink to mark it offline.

        Raises:
            KeyError: no SuperNode ``name`` was started.
            FedPeftError: it was still online after ``offline_timeout`` seconds.
        """
        spec = self.supernodes[name]
        if spec.children and spec.children[0].popen.poll() is None:
            self.kill_supernode(name)
        node_id = self.node_ids.get(name)
        if node_id is not None:
            started = time.monotonic()
            deadline = started + offline_timeout
            while True:
                proc = self._cli("supernode", "list", CONNECTION, "--format", "json")
                if proc.returncode == 0 and _node_status(proc.stdout).get(node_id) != "online":
                    break
                if time.monotonic() > deadline:
                    raise FedPeftError(
                        f"the SuperLink still lists {name} (node id {node_id}) as online "
                        f"{offline_timeout:.0f} s after it was stopped"
                    )
                time.sleep(1.0)
            waited = time.monotonic() - started
            self.echo(f"the SuperLink lists {name} offline after {waited:.0f} s; restarting it")
        return self._launch(spec)

    def wait_online(self, names: Sequence[str]) -> None:
        """Wait until the SuperLink lists every node in ``names`` as online.

        Raises:
            FedPeftError: a SuperNode exited, or not all came online in time.
        """
        want = {self.node_ids[n] for n in names}
        deadline = time.monotonic() + self.startup_timeout
        online: set[int] = set()
        while time.monotonic() < deadline:
            for child in self.children:
                if child.daemon:
                    self._check_alive(child, "waiting for the SuperNodes to connect")
            proc = self._cli("supernode", "list", CONNECTION, "--format", "json")
            if proc.returncode == 0:
                online = {
                    nid for nid, status in _node_status(proc.stdout).items() if status == "online"
                }
                if want <= online:
                    self.echo(f"{len(want)} SuperNodes online")
                    return
            time.sleep(1.0)
        raise FedPeftError(
            f"only {len(want & online)} of {len(want)} SuperNodes came online within "
            f"{self.startup_timeout:.0f} s; logs in {self.logs}"
        )

    def run(self, run_config: Mapping[str, Scalar], timeout: float | None = None) -> int:
        """``flwr run <app> fedpeft-local --stream -c run-config.toml``; return its exit code.

        Output is echoed line by line and kept in ``logs/flwr-run.log``. The run is
        abandoned (FedPeftError) if a SuperLink/SuperNode process dies meanwhile.
        """
        config_path = self.work_dir / "run-config.toml"
        config_path.write_text(render_run_config(run_config))
        cmd = ["flwr", "run", str(self.app_dir), CONNECTION, "--stream", "-c", str(config_path)]
        log_path = self.logs / "flwr-run.log"
        offset = log_path.stat().st_size if log_path.exists() else 0  # an earlier run's
        child = self._spawn("flwr-run", cmd, self._env("cli"), daemon=False)
        deadline = None if timeout is None else time.monotonic() + timeout
        with child.log_path.open("rb") as log:
            log.seek(offset)
            while True:
                self._pump(log)
                if child.popen.poll() is not None:
                    self._pump(log)
                    return int(child.popen.returncode)
                with self._lock:
                    for other in self.children:
                        if other.daemon:
                            self._check_alive(other, "the run was in progress")
                if deadline is not None and time.monotonic() > deadline:
                    raise FedPeftError(f"the run did not finish within {timeout:.0f} s")
                time.sleep(0.2)

    def resume(self, run_config: Mapping[str, Scalar], timeout: float | None = None) -> int:
        """:meth:`run` with ``checkpoint.resume = true``: a new Flower run that continues
        ``run_config``'s run from the newest checkpoint in its ``output.dir`` (the
        ServerApp refuses a missing or foreign checkpoint); return its exit code."""
        return self.run({**run_config, "checkpoint.resume": True}, timeout=timeout)

    def _pump(self, log: IO[bytes]) -> None:
        for raw in log.readlines():
            self.echo(raw.decode(errors="replace").rstrip("\n"))

    # -- shutdown -------------------------------------------------------------------
    def stop(self) -> None:
        """Stop every started process: SIGTERM to its group, SIGKILL after the timeout.

        Children stop in reverse start order (the run, SuperExecs and SuperNodes,
        then the SuperLink); descendants that left their group are killed last.
        """
        for child in reversed(self.children):
            if child.popen.returncode is None:
                child.descendants = _descendants(child.popen.pid)
                self._stop_one(child)
        for child in self.children:
            for pid in child.descendants:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
        self.children = [c for c in self.children if c.popen.returncode is None]

    def _stop_one(self, child: _Child) -> None:
        pid = child.popen.pid
        # While the child is not reaped its PID (= its process group id) stays
        # reserved, so signalling the group can only reach what we started.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGTERM)
        deadline = time.monotonic() + self.stop_timeout
        while not _exited(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)
        child.popen.wait()


def _node_id(stdout: str) -> int:
    """The node id in ``flwr supernode register --format json`` output."""
    data = json.loads(stdout)
    for key in ("node-id", "node_id", "nodeId"):
        if key in data:
            return int(data[key])
    raise FedPeftError(f"no node id in `flwr supernode register` output: {stdout[:500]}")


def _node_status(stdout: str) -> dict[int, str]:
    """``node id -> status`` from ``flwr supernode list --format json``."""
    data = json.loads(stdout)
    nodes = data.get("nodes", data if isinstance(data, list) else [])
    out = {}
    for node in nodes:
        nid = node.get("node-id", node.get("node_id"))
        if nid is not None:
            out[int(nid)] = str(node.get("status", "")).lower()
    return out


@contextlib.contextmanager
def _terminate_on_signals() -> Iterator[None]:
    """Turn SIGTERM/SIGHUP into SystemExit so ``finally`` blocks run (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def deploy_local(
    flat_config: FlatConfig,
    nodes: int,
    rounds: int | None = None,
    out_dir: str | os.PathLike[str] | None = None,
    *,
    certs_dir: str | os.PathLike[str] | None = None,
    work_dir: str | os.PathLike[str] | None = None,
    app_dir: str | os.PathLike[str] | None = None,
    isolation: str = "subprocess",
    node_configs: Sequence[Mapping[str, Scalar]] | None = None,
    threads_per_node: int | None = None,
    env: Mapping[str, str] | None = None,
    echo: Callable[[str], None] | None = print,
    run_timeout: float | None = None,
    warm: bool = True,
) -> pathlib.Path:
    """Run ``flat_config`` on a real loopback deployment; return the results directory.

    Args:
        flat_config: run config (the same keys as ``fedpeft simulate``).
        nodes: number of SuperNodes (sets ``federation.clients``).
        rounds: ``federation.rounds`` (None: keep the config's).
        out_dir: ``output.dir`` (None: the config's, else ``runs/<strategy>-<time>``).
        certs_dir: a ``fedpeft certs`` directory with at least ``nodes`` nodes (None:
            fresh certificates and keys in the work directory).
        work_dir: logs, databases, ``FLWR_HOME``s (None: a temporary directory,
            removed afterwards unless the run failed).
        app_dir: the Flower app directory (None: this project).
        isolation: ``subprocess`` (default) or ``process``.
        node_configs: extra node-config entries per node, e.g. ``{"device.tier": "fast"}``.
        threads_per_node: ``OMP_NUM_THREADS`` of each node's ClientApps (None:
            ``cpu_count // nodes``, at least 1 — the nodes share this machine).
        env: extra environment of every process (e.g. ``FEDPEFT_CACHE``).
        echo: progress output (None: silent).
        run_timeout: seconds before the run is abandoned (None: no limit).
        warm: start ClientApps from a warm zygote per node (Flower starts a process
            per message; the zygote forks them with torch, transformers, peft and flwr
            imported and, after a run's first message, its model and data built);
            False: Flower's cold ``flwr-clientapp`` for every message.

    Raises:
        ConfigError: the config is invalid or names keys ``flwr run`` cannot take.
        FedPeftError: a process failed, or the run ended without complete results
            (the message names the logs).
    """
    flat = dict(flat_config)
    flat["federation.clients"] = nodes
    if rounds is not None:
        flat["federation.rounds"] = rounds
    if out_dir is not None:
        flat["output.dir"] = str(out_dir)
    cfg = parse_run_config(flat)
    from datetime import datetime

    results = (
        pathlib.Path(cfg.output.dir).expanduser().resolve()
        if cfg.output.dir
        else (
            pathlib.Path("runs") / f"{cfg.strategy.name}-{datetime.now():%Y%m%d-%H%M%S}"
        ).resolve()
    )
    flat["output.dir"] = str(results)
    app = pathlib.Path(app_dir).resolve() if app_dir else default_app_dir()
    typed = cfg.to_flat()
    run_config = {k: typed.get(k, v) for k, v in flat.items()}
    unknown = sorted(set(run_config) - app_config_keys(app))
    if unknown:
        raise ConfigError(
            [
                f"{k!r} is not in [tool.flwr.app.config] of {app / 'pyproject.toml'}; "
                "`flwr run -c` only accepts keys listed there"
                for k in unknown
            ]
        )
    if node_configs is not None and len(node_configs) != nodes:
        raise ConfigError(
            f"node_configs has {len(node_configs)} entries, expected one per node ({nodes})"
        )

    own_work = work_dir is None
    work = pathlib.Path(work_dir or tempfile.mkdtemp(prefix="fedpeft-deploy-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    manifest = (
        load_manifest(certs_dir) if certs_dir is not None else generate_certs(work / "certs", nodes)
    )
    if len(manifest.nodes) < nodes:
        raise FedPeftError(
            f"{manifest.directory} has keys for {len(manifest.nodes)} SuperNodes, need {nodes}; "
            f"add more with fedpeft.deploy.certs.add_supernodes or `fedpeft certs --nodes {nodes}`"
        )
    threads = threads_per_node or max(1, (os.cpu_count() or 1) // nodes)
    say = echo or (lambda line: None)
    say(f"results → {results}   (logs → {work / 'logs'})")
    ok = False
    started = time.perf_counter()
    with (
        _terminate_on_signals(),
        LocalDeployment(manifest, work, app, isolation, env, echo=echo, warm=warm) as dep,
    ):
        dep.start_superlink()
        chosen = manifest.nodes[:nodes]
        for node in chosen:
            dep.register(node)
        for i, node in enumerate(chosen):
            dep.start_supernode(node, nodes, (node_configs or [{}] * nodes)[i], threads=threads)
        dep.wait_online([n.name for n in chosen])
        if warm:
            say(f"{dep.wait_zygotes()} of {nodes} warm ClientApp zygotes ready")
        code = dep.run(run_config, timeout=run_timeout)
        summary = results / "summary.json"
        if code != 0 or not summary.exists():
            raise FedPeftError(
                f"`flwr run` exited with code {code}"
                + ("" if summary.exists() else f" without results in {results}")
                + f"; logs in {work / 'logs'}"
            )
        data = json.loads(summary.read_text())
        done = data["rounds"]
        if "stopped" in data:  # the ServerApp stopped early (a byte budget is a normal end)
            say(f"stopped: {data['stopped']}")
            if "budget.bytes" not in str(data["stopped"]):
                raise FedPeftError(f"{data['stopped']}; partial results in {results}")
        elif len(done) < cfg.federation.rounds + 1:
            raise FedPeftError(
                f"the run stopped after round {done[-1]['round'] if done else 0} of "
                f"{cfg.federation.rounds}; partial results in {results}, logs in {work / 'logs'}"
            )
        ok = True
    say(f"done in {time.perf_counter() - started:.0f} s — results in {results}")
    if ok and own_work:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    return results
