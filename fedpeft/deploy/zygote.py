"""A fork server ("zygote") that starts Flower ClientApp processes warm.

Why: Flower 1.41 starts a new ``flwr-clientapp`` process for every message (the
SuperExec's subprocess executor runs ``subprocess.Popen(["flwr-clientapp", …])``
through ``PATH``; ``run_clientapp`` handles one message, then the process exits —
FLOWER.md §9.1). Each one re-imports torch, transformers, peft and flwr and rebuilds
the model and data: 7–12 s per message with MiniLM, where a simulation worker keeps
all of it in memory.

How: one long-lived zygote per node imports those libraries once (``preload``) and
listens on a Unix socket. The ``flwr-clientapp`` *shim* that
:func:`install_shim` puts first on the launcher's ``PATH`` (source:
:mod:`fedpeft.deploy.zygote_shim`) sends its argv, environment, cwd and
stdin/stdout/stderr (``SCM_RIGHTS``) to the zygote, which forks; the child takes
over those descriptors, environment and cwd and runs Flower's real ``flwr-clientapp``
main (``child``), while the shim forwards SIGTERM/SIGINT to it and exits with its
status. Between messages a child may ask the zygote to build what it just used
(``warm``), so later forks find it in memory, copy-on-write. If no zygote answers,
the shim runs the real ``flwr-clientapp``: never worse than without it.

This module is transport-agnostic and imports neither flwr nor torch: the three
hooks are ``module:function`` references (fedpeft's are in
:mod:`fedpeft.flower.warm_clientapp`).

Fork safety: the zygote stays single-threaded in Python (checked before every fork;
a zygote with extra Python threads refuses and the shim falls back), and ``preload``
pins torch to one intra-op thread before any torch op, so no OpenMP (GNU libgomp,
not fork-safe) pool exists when it forks; each child sets its own thread count.
numpy's OpenBLAS pool is shut down around ``fork`` by OpenBLAS's own ``pthread_atfork``
handler.

Protocol (``SOCK_SEQPACKET``; one JSON object per packet):

* ``{"op": "fork", "argv", "env", "cwd"}`` + 3 descriptors → ``{"ready": true}``
  (or ``{"error": why}``: the shim falls back); the shim answers ``{"go": true}``
  (it may instead give up and fall back: nothing was forked yet) → ``{"pid": n}``,
  later ``{"exit": code}`` or
  ``{"signal": n}`` when the child ends; if the shim's connection closes first, the
  child gets SIGTERM (SIGKILL ``kill_timeout`` seconds later);
* ``{"op": "warm", "request": {...}}`` → ``{"ok": bool}`` after ``warm(request)``;
* ``{"op": "status"}`` → pid, children, last warm result.

Run: :func:`command` (``python -c BOOTSTRAP --socket PATH``; SIGTERM stops it and its
children); :func:`install_shim` writes the shim.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import pathlib
import selectors
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

SOCKET_ENV = "FEDPEFT_ZYGOTE_SOCKET"
"""The environment variable naming the zygote's socket (read by the shim and children)."""
REAL_ENV = "FEDPEFT_ZYGOTE_REAL"
"""Optional: the real ``flwr-clientapp`` the shim falls back to (default: next on PATH)."""
MAX_PACKET = 1 << 20
IGNORED_ENV = frozenset(
    {
        "_",
        "PWD",
        "OLDPWD",
        "SHLVL",
        SOCKET_ENV,
        REAL_ENV,
        "FEDPEFT_ZYGOTE_WAIT",
        "FEDPEFT_ZYGOTE_DEBUG",
        "FEDPEFT_CLIENT_TIMINGS",
        # set by the SuperNode's/SuperExec's own flwr imports (a connector module) and
        # inherited by the ClientApp; read only by browser-use, which no ClientApp imports
        "BROWSER_USE_SETUP_LOGGING",
    }
)
"""Variables allowed to differ between the zygote's and a request's environment.

Everything else must match: libraries read variables such as ``HF_HUB_OFFLINE`` when
imported, i.e. in the zygote, so a request with a different environment is refused
(the shim then runs the real ``flwr-clientapp``)."""
DEFAULT_PRELOAD = "fedpeft.flower.warm_clientapp:preload"
DEFAULT_CHILD = "fedpeft.flower.warm_clientapp:child_main"
DEFAULT_WARM = "fedpeft.flower.warm_clientapp:warm"


def resolve(ref: str) -> Callable[..., Any]:
    """``"package.module:function"`` → the function."""
    module, _, name = ref.partition(":")
    return getattr(importlib.import_module(module), name)  # type: ignore[no-any-return]


def send(sock: socket.socket, obj: Mapping[str, Any], fds: Sequence[int] = ()) -> None:
    """One JSON packet, with descriptors if any."""
    data = json.dumps(obj).encode()
    if fds:
        socket.send_fds(sock, [data], list(fds))
    else:
        sock.send(data)


def receive(sock: socket.socket, maxfds: int = 0) -> tuple[dict[str, Any] | None, list[int]]:
    """One JSON packet and its descriptors; ``(None, [])`` at end of stream."""
    data, fds, _, _ = socket.recv_fds(sock, MAX_PACKET, maxfds)
    if not data:
        for fd in fds:
            os.close(fd)
        return None, []
    return json.loads(data), fds


def env_difference(
    mine: Mapping[str, str], theirs: Mapping[str, str], now: Mapping[str, str] | None = None
) -> list[str]:
    """Names of variables whose value in ``theirs`` is neither the one in ``mine`` (the
    zygote's environment at start) nor the one in ``now`` (its environment after its
    imports set some, e.g. ``GRPC_VERBOSITY``, as the launcher's imports did in its
    own), not counting :data:`IGNORED_ENV`; sorted."""
    now = mine if now is None else now
    keys = (set(mine) | set(theirs)) - IGNORED_ENV
    return sorted(k for k in keys if theirs.get(k) not in (mine.get(k), now.get(k)))


def python_threads() -> int:
    """Python threads alive in this process (1: only the main thread)."""
    return threading.active_count()


@dataclass
class _Running:
    """A forked child and the shim connection waiting for its status."""

    pid: int
    conn: socket.socket
    kill_at: float | None = None  # SIGKILL deadline after the shim went away


class Zygote:
    """The fork server.

    Args:
        socket_path: Unix socket to listen on (≤ 107 bytes; replaced if stale).
        child: ``child(argv) -> exit code``, run in each forked child after it took
            over the shim's descriptors, environment and cwd.
        warm: ``warm(request) -> Any`` (JSON-able), run in the zygote between forks;
            an exception is logged and answered ``{"ok": false}``.
        env: the environment requests must match: this process's before ``preload``
            (default: its current one). Variables the zygote's own imports set since
            are passed on to each child.
        kill_timeout: seconds between SIGTERM and SIGKILL for orphaned children.
        log: where diagnostics go (stderr by default).
    """

    def __init__(
        self,
        socket_path: str | os.PathLike[str],
        child: Callable[[list[str]], int],
        warm: Callable[[dict[str, Any]], Any] | None = None,
        env: Mapping[str, str] | None = None,
        kill_timeout: float = 10.0,
        log: Callable[[str], None] | None = None,
    ) -> None:
        self.path = str(socket_path)
        self.child = child
        self.warm_fn = warm
        self.env = {k: v for k, v in (env if env is not None else os.environ).items()}
        self.kill_timeout = kill_timeout
        self.go_timeout = 10.0
        self.log = log or (
            lambda line: print(f"zygote[{os.getpid()}]: {line}", file=sys.stderr, flush=True)
        )
        self.running: dict[int, _Running] = {}
        self.last_warm: Any = None
        self.forks = 0
        self._stop = False

    # -- serving ----------------------------------------------------------------------
    def serve(self, ready: Callable[[], None] | None = None) -> None:
        """Listen until SIGTERM/SIGINT; then stop every child and remove the socket."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        listener.bind(self.path)
        os.chmod(self.path, 0o600)  # only this user may ask for a ClientApp
        listener.listen(64)
        wake_r, wake_w = os.pipe()
        os.set_blocking(wake_r, False)
        os.set_blocking(wake_w, False)
        old_wakeup = signal.set_wakeup_fd(wake_w)
        handlers = {s: signal.signal(s, self._on_stop) for s in (signal.SIGTERM, signal.SIGINT)}
        old_chld = signal.signal(signal.SIGCHLD, lambda *_: None)  # wakes select via the fd
        sel = selectors.DefaultSelector()
        sel.register(listener, selectors.EVENT_READ, "accept")
        sel.register(wake_r, selectors.EVENT_READ, "wake")
        self._sel, self._listener, self._wake = sel, listener, (wake_r, wake_w)
        self.log(f"listening on {self.path}")
        if ready:
            ready()
        try:
            while not self._stop:
                for key, _ in sel.select(timeout=self._timeout()):
                    if key.data == "accept":
                        conn, _ = listener.accept()
                        sel.register(conn, selectors.EVENT_READ, "request")
                    elif key.data == "wake":
                        with contextlib.suppress(BlockingIOError):
                            os.read(wake_r, 4096)
                    elif key.data == "request":
                        self._request(key.fileobj)  # type: ignore[arg-type]
                    elif isinstance(key.data, _Running):
                        self._shim_event(key.data)
                self._reap()
                self._kill_overdue()
        finally:
            self._shutdown()
            for s, h in handlers.items():
                signal.signal(s, h)
            signal.signal(signal.SIGCHLD, old_chld)
            signal.set_wakeup_fd(old_wakeup)
            sel.close()
            listener.close()
            os.close(wake_r)
            os.close(wake_w)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)

    def _on_stop(self, signum: int, frame: object) -> None:
        self._stop = True

    def _timeout(self) -> float | None:
        deadlines = [r.kill_at for r in self.running.values() if r.kill_at is not None]
        return max(0.0, min(deadlines) - time.monotonic()) if deadlines else None

    def _request(self, conn: socket.socket) -> None:
        try:
            msg, fds = receive(conn, maxfds=3)
        except (OSError, ValueError) as err:
            self.log(f"bad request: {err}")
            msg, fds = None, []
        if msg is None:
            self._sel.unregister(conn)
            conn.close()
            return
        op = msg.get("op")
        if op == "fork" and len(fds) == 3:
            try:
                self._fork(conn, msg, fds)  # owns fds; conn stays open until the child ends
            except (OSError, KeyError, TypeError) as err:
                self.log(f"fork request failed: {err}")
                if conn.fileno() >= 0 and not any(r.conn is conn for r in self.running.values()):
                    with contextlib.suppress(KeyError, ValueError):
                        self._sel.unregister(conn)
                    conn.close()
            return
        try:
            if op == "warm" and self.warm_fn is not None:
                self._warm(conn, msg.get("request", {}))
            elif op == "status":
                send(conn, self.status())
            else:
                send(conn, {"error": f"unknown request {op!r} with {len(fds)} descriptors"})
        except OSError:
            pass  # the other side went away
        finally:
            for fd in fds:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._sel.unregister(conn)
        conn.close()

    def status(self) -> dict[str, Any]:
        """What a ``status`` request answers (tests, diagnostics)."""
        return {
            "pid": os.getpid(),
            "children": sorted(self.running),
            "forks": self.forks,
            "warm": self.last_warm,
            "python_threads": python_threads(),
        }

    def _warm(self, conn: socket.socket, request: dict[str, Any]) -> None:
        started = time.perf_counter()
        try:
            assert self.warm_fn is not None
            self.last_warm = self.warm_fn(request)
            ok = True
        except Exception as err:  # a bad request must not stop the zygote
            self.log(f"warm failed: {type(err).__name__}: {err}")
            ok = False
        self.log(f"warm {'done' if ok else 'failed'} in {time.perf_counter() - started:.1f} s")
        with contextlib.suppress(OSError):
            send(conn, {"ok": ok})

    def _fork(self, conn: socket.socket, msg: dict[str, Any], fds: list[int]) -> None:
        try:
            argv, env, cwd = list(msg["argv"]), dict(msg["env"]), str(msg["cwd"])
        except (KeyError, TypeError):
            argv, env, cwd = [], {}, ""
        differ = env_difference(self.env, env, os.environ) if argv else ["<malformed request>"]
        threads = python_threads()
        if differ or threads != 1:
            why = (
                f"environment differs from the zygote's in {', '.join(differ[:8])}"
                if differ
                else f"{threads} Python threads alive; forking is unsafe"
            )
            self.log(f"refused a ClientApp: {why}")
            with contextlib.suppress(OSError):
                send(conn, {"error": why})
            for fd in fds:
                os.close(fd)
            self._sel.unregister(conn)
            conn.close()
            return
        # two-phase start: fork only once the shim confirms it still waits (a shim that
        # timed out runs the real flwr-clientapp; the message must not run twice)
        go = None
        try:
            send(conn, {"ready": True})
            conn.settimeout(self.go_timeout)
            go, _ = receive(conn)
        except (OSError, ValueError):
            go = None
        finally:
            with contextlib.suppress(OSError):
                conn.settimeout(None)
        if not go or not go.get("go"):
            self.log("a shim left before its ClientApp started")
            for fd in fds:
                os.close(fd)
            self._sel.unregister(conn)
            conn.close()
            return
        sys.stdout.flush()
        sys.stderr.flush()
        try:
            pid = os.fork()
        except OSError:
            for fd in fds:
                os.close(fd)
            raise
        if pid == 0:  # the child: never returns
            self._become_child(conn, argv, env, cwd, fds)
        for fd in fds:
            os.close(fd)
        self.forks += 1
        running = _Running(pid, conn)
        self.running[pid] = running
        self._sel.modify(conn, selectors.EVENT_READ, running)
        send(conn, {"pid": pid})

    def _become_child(
        self, conn: socket.socket, argv: list[str], env: dict[str, str], cwd: str, fds: list[int]
    ) -> None:
        code = 1
        try:
            signal.set_wakeup_fd(-1)
            for s in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD):
                signal.signal(s, signal.SIG_DFL)
            _die_with_parent()
            self._sel.close()
            self._listener.close()
            os.close(self._wake[0])
            os.close(self._wake[1])
            for other in self.running.values():
                other.conn.close()
            conn.close()
            for target, fd in enumerate(fds):
                os.dup2(fd, target)
            for fd in fds:
                if fd > 2:
                    os.close(fd)
            os.chdir(cwd)
            changed = {k: v for k, v in os.environ.items() if self.env.get(k) != v}
            removed = set(self.env) - set(os.environ)
            os.environ.clear()
            # the request's environment, plus what imports in the zygote set in its own
            # (as they would have in a fresh process)
            os.environ.update({k: v for k, v in env.items() if k not in removed})
            os.environ.update(changed)
            sys.argv = list(argv)
            code = self.child(argv)
        except SystemExit as stop:
            code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
        except BaseException:  # report, never return into the zygote's loop
            import traceback

            traceback.print_exc()
            code = 1
        finally:
            _exit_child(code)

    def _shim_event(self, running: _Running) -> None:
        """The shim's connection is readable: it closed (or sent junk) → stop the child."""
        with contextlib.suppress(OSError):
            if running.conn.recv(MAX_PACKET):
                return
        self._sel.unregister(running.conn)
        if running.kill_at is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(running.pid, signal.SIGTERM)
            running.kill_at = time.monotonic() + self.kill_timeout

    def _reap(self) -> None:
        while self.running:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            running = self.running.pop(pid, None)
            if running is None:
                continue
            result = (
                {"signal": os.WTERMSIG(status)}
                if os.WIFSIGNALED(status)
                else {"exit": os.waitstatus_to_exitcode(status)}
            )
            if running.kill_at is None:
                with contextlib.suppress(OSError):
                    send(running.conn, result)
                self._sel.unregister(running.conn)
            running.conn.close()

    def _kill_overdue(self) -> None:
        now = time.monotonic()
        for running in self.running.values():
            if running.kill_at is not None and now >= running.kill_at:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(running.pid, signal.SIGKILL)

    def _shutdown(self) -> None:
        """SIGTERM every child, SIGKILL after ``kill_timeout``, reap them all."""
        for running in self.running.values():
            with contextlib.suppress(ProcessLookupError):
                os.kill(running.pid, signal.SIGTERM)
        deadline = time.monotonic() + self.kill_timeout
        while self.running and time.monotonic() < deadline:
            self._reap()
            time.sleep(0.05)
        for running in list(self.running.values()):
            with contextlib.suppress(ProcessLookupError):
                os.kill(running.pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(running.pid, 0)
            running.conn.close()
        self.running.clear()


def _die_with_parent() -> None:
    """Linux: the child gets SIGKILL if the zygote dies (``PR_SET_PDEATHSIG``)."""
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError, AttributeError):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG = 1


def _exit_child(code: int) -> None:
    """End a forked child as an interpreter exit would: atexit handlers, flushed streams."""
    with contextlib.suppress(BaseException):
        import atexit

        atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(BaseException):
            stream.flush()
    os._exit(code & 0xFF if code >= 0 else 1)


# -- the shim ---------------------------------------------------------------------------


def shim_source(python: str | None = None) -> str:
    """The shim script: :mod:`fedpeft.deploy.zygote_shim`'s source with a shebang that
    runs it isolated (``-I``: no user site, no ``PYTHON*`` variables; ``-S``: no site),
    so it starts in tens of milliseconds."""
    source = (pathlib.Path(__file__).with_name("zygote_shim.py")).read_text()
    return f"#!{python or sys.executable} -IS\n{source}"


def install_shim(bin_dir: str | os.PathLike[str], python: str | None = None) -> pathlib.Path:
    """Write the ``flwr-clientapp`` shim into ``bin_dir``; return its path.

    Put ``bin_dir`` first on the ``PATH`` of the process that launches ClientApps
    (the SuperNode in ``subprocess`` isolation, its SuperExec in ``process``
    isolation) and :data:`SOCKET_ENV` in its environment.
    """
    path = pathlib.Path(bin_dir) / "flwr-clientapp"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(shim_source(python))
    tmp.chmod(0o755)
    os.replace(tmp, path)
    return path


def socket_path(directory: str | os.PathLike[str], name: str) -> pathlib.Path:
    """``<directory>/<name>.sock``, or a short path under the temp directory when that
    would exceed the 107-byte limit of a Unix socket address."""
    path = pathlib.Path(directory).resolve() / f"{name}.sock"
    if len(os.fsencode(str(path))) <= 100:
        return path
    import hashlib
    import tempfile

    digest = hashlib.sha256(str(path).encode()).hexdigest()[:12]
    return pathlib.Path(tempfile.gettempdir()) / f"fpz-{digest}-{name[:20]}.sock"


def launcher_env(
    env: Mapping[str, str], bin_dir: str | os.PathLike[str], sock: str | os.PathLike[str]
) -> dict[str, str]:
    """``env`` with the shim's directory first on ``PATH`` and the zygote's socket set:
    the environment of a process that launches ClientApps (and of its zygote)."""
    out = dict(env)
    out["PATH"] = f"{bin_dir}{os.pathsep}{out.get('PATH', '')}"
    out[SOCKET_ENV] = str(sock)
    return out


BOOTSTRAP = (
    "import os, sys; env = dict(os.environ); "
    "from fedpeft.deploy.zygote import main; sys.exit(main(env=env))"
)
"""Starts a zygote with a copy of the environment taken before anything is imported
(importing fedpeft already imports transformers, which sets variables)."""


def command(sock: str | os.PathLike[str], python: str | None = None) -> list[str]:
    """The command line of a zygote listening on ``sock``."""
    return [python or sys.executable, "-c", BOOTSTRAP, "--socket", str(sock)]


def ping(socket_path: str | os.PathLike[str], timeout: float = 2.0) -> dict[str, Any] | None:
    """The zygote's ``status`` answer, or None if none answers."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as sock:
            sock.settimeout(timeout)
            sock.connect(str(socket_path))
            send(sock, {"op": "status"})
            msg, _ = receive(sock)
            return msg
    except OSError:
        return None


def wait_ready(
    socket_path: str | os.PathLike[str], timeout: float, alive: Callable[[], bool] = lambda: True
) -> bool:
    """Wait until a zygote answers at ``socket_path`` (False on timeout or death)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and alive():
        if ping(socket_path, timeout=1.0) is not None:
            return True
        time.sleep(0.1)
    return False


def main(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> int:
    """``python -m fedpeft.deploy.zygote --socket PATH [--preload/--child/--warm REF]``.

    ``env``: the environment requests must match (:data:`BOOTSTRAP` passes the one it
    started with); default: the current one, before ``preload``.
    """
    parser = argparse.ArgumentParser(description="fork server for warm Flower ClientApps")
    parser.add_argument("--socket", default=os.environ.get(SOCKET_ENV))
    parser.add_argument("--preload", default=DEFAULT_PRELOAD)
    parser.add_argument("--child", default=DEFAULT_CHILD)
    parser.add_argument("--warm", default=DEFAULT_WARM)
    parser.add_argument("--kill-timeout", type=float, default=10.0)
    args = parser.parse_args(argv)
    if not args.socket:
        parser.error(f"--socket (or ${SOCKET_ENV}) is required")
    started = time.perf_counter()
    env = dict(env if env is not None else os.environ)
    if args.preload:
        resolve(args.preload)()
    zygote = Zygote(
        args.socket,
        env=env,
        child=resolve(args.child),
        warm=resolve(args.warm) if args.warm else None,
        kill_timeout=args.kill_timeout,
    )
    zygote.log(f"preloaded in {time.perf_counter() - started:.1f} s")
    zygote.serve()
    return 0


if __name__ == "__main__":
    sys.exit(main())
