"""Stopping a simulation: Ctrl-C, SIGTERM, engine failures, and the processes it started.

Why this exists (measured with flwr 1.41 / ray 2.55): ``flwr.simulation.run_simulation``
runs the ServerApp in a non-daemon thread and the Ray backend in the calling (main)
thread. On Ctrl-C the main thread unwinds and shuts Ray down, but the ServerApp thread
keeps waiting for replies that will never come — for ``federation.timeout × (1 +
federation.max-retries)`` — and the interpreter waits for it before exiting. An engine
failure (no actor fits, ``ActorPool is empty``) hangs the same way. And ``ray.init``
replaces the process's SIGTERM handler with one that calls ``sys.exit``.

:class:`EngineGuard` fixes all three from the outside, without patching the engine's
control flow:

* **Signals.** SIGINT / SIGTERM handlers (main thread only) record why the run stops
  and raise :class:`EngineInterrupt` in the main thread, which unwinds the engine (its
  ``finally`` blocks stop the actors and Ray), also from inside ``ray.init`` (holding the
  signal until Ray is up took up to 18 s on a busy machine; a half-started Ray is
  cleaned up like any other). A second signal exits at once (``os._exit`` after killing
  the run's processes).
* **The ServerApp thread** gets a :class:`GuardedGrid`: every grid call first checks the
  guard and raises :class:`EngineStopped` once the run is stopping, so the thread ends at
  its next poll (≤ 0.1 s while it waits for replies) instead of at the timeout.
* **Engine failures**: an exception out of the engine, or a ClientApp actor that dies
  (``RayActorError`` seen by the backend), stops the run the same way with exit status 2.
* **Processes.** After the engine unwinds, ``ray.shutdown()`` runs again (idempotent) and
  every process this run started that is still alive (gcs_server, raylet, agents,
  workers: descendants of this process that did not exist before the run; during the
  run this process is a child subreaper, so orphans stay descendants) gets SIGTERM,
  then SIGKILL one second later. A watchdog bounds
  the whole stop to ``grace`` seconds: if cleanup or the interpreter's exit (which joins
  non-daemon threads) hangs, it kills the run's processes and calls ``os._exit``.

Checkpoints are written crash-safely (:mod:`fedpeft.checkpoint`), so stopping at any
instant leaves the last complete one.

Exit statuses: 130 for SIGINT and 143 for SIGTERM (128 + signal number, the shell
convention), 2 for an engine failure.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import psutil
from flwr.app import Message
from flwr.serverapp import Grid

from fedpeft.errors import FedPeftError

EXIT_ENGINE_FAILURE = 2
"""Exit status of a run the engine could not carry on (same as any other ``error:``)."""


class EngineStopped(FedPeftError):
    """Raised inside the ServerApp thread, at its next grid call, once the run is stopping."""


class EngineInterrupt(KeyboardInterrupt):
    """Raised in the main thread to unwind the engine.

    A ``KeyboardInterrupt`` (a ``BaseException``) so the engine's ``except Exception``
    blocks let it through instead of wrapping it and logging a traceback, and so code
    that does not know this class treats it as the Ctrl-C it usually is.
    """


class SimulationStopped(FedPeftError):
    """The run was stopped before it finished.

    Attributes:
        exit_code: 130 (SIGINT), 143 (SIGTERM) or 2 (engine failure).
        interrupted: True for a signal (print as ``stopped:``), False for an engine
            failure (print as ``error:``).
    """

    def __init__(self, message: str, exit_code: int, interrupted: bool) -> None:
        super().__init__(message)
        self.exit_code = exit_code
        self.interrupted = interrupted


@dataclass(frozen=True)
class StopRequest:
    """Why the run stops: a one-line reason and the process exit status."""

    reason: str
    exit_code: int
    interrupted: bool


# ray.exceptions names of an actor (worker process) that is gone for good
_DEAD_ACTOR_ERRORS = ("RayActorError", "WorkerCrashedError", "NodeDiedError")
_TRANSIENT_ACTOR_ERRORS = ("ActorUnavailableError",)


def is_dead_actor_error(err: BaseException) -> bool:
    """True if ``err`` (or one of its bases) is a Ray error for a dead actor/worker/node."""
    names = {cls.__name__ for cls in type(err).__mro__}
    return bool(names & set(_DEAD_ACTOR_ERRORS)) and not names & set(_TRANSIENT_ACTOR_ERRORS)


def describe_actor_error(err: BaseException) -> str:
    """One line from Ray's multi-line actor error: its first line and why it died."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    why = [
        line for line in lines[1:] if line.lower().startswith(("the actor is dead", "worker exit"))
    ]
    text = " ".join((lines[:1] + why[:2]) or [""])
    return f"{type(err).__name__}: {text[:300]}"


def root_cause(err: BaseException) -> BaseException:
    """The innermost exception of ``err``'s ``__cause__`` / ``__context__`` chain."""
    seen = {id(err)}
    while True:
        nxt = err.__cause__ or err.__context__
        if nxt is None or id(nxt) in seen:
            return err
        seen.add(id(nxt))
        err = nxt


class EngineGuard:
    """Stops one simulation run on a signal or an engine failure (see the module doc).

    Args:
        grace: seconds from the stop request to a forced exit, if the orderly stop
            (engine unwinding, Ray shutdown, threads ending) has not finished by then.
        hint: returns the tail of the final line (where the checkpoint is, how to
            resume); used by the forced exit, which prints that line itself.
    """

    def __init__(self, grace: float = 15.0, hint: Callable[[], str] | None = None) -> None:
        self.grace = grace
        self.hint = hint or (lambda: "")
        self.request: StopRequest | None = None
        self.reported = False  # the caller printed the final line
        self.finished = threading.Event()  # the orderly stop completed
        self._disarmed = threading.Event()
        self._event = threading.Event()
        self._lock = threading.Lock()
        self._wake_main = False
        self._previous: dict[int, Any] = {}
        self._me = psutil.Process()
        self._baseline = self._descendant_keys()
        self._known: dict[tuple[int, float], psutil.Process] = {}
        self._threads_before = {t.ident for t in threading.enumerate()}
        self.server_thread: threading.Thread | None = None

    # ------------------------------------------------------------------ state
    @property
    def stopping(self) -> bool:
        """True once a stop was requested."""
        return self._event.is_set()

    def check(self) -> None:
        """Raise :class:`EngineStopped` if the run is stopping (called by the grid)."""
        if self._event.is_set():
            assert self.request is not None
            raise EngineStopped(self.request.reason)

    def stop(self, reason: str, exit_code: int, interrupted: bool) -> bool:
        """Request a stop; the first request wins. Returns True if this one was first.

        Arms the watchdog and remembers the run's processes while they are still
        descendants of this process.
        """
        with self._lock:
            if self.request is not None:
                return False
            self.request = StopRequest(reason, exit_code, interrupted)
            self._event.set()
        self.remember_processes()
        threading.Thread(target=self._watchdog, name="fedpeft-stop-watchdog", daemon=True).start()
        return True

    def fail(self, reason: str) -> None:
        """An engine failure seen outside the main thread: stop and wake the main thread."""
        if self.stop(reason, EXIT_ENGINE_FAILURE, interrupted=False):
            self._interrupt_main()

    def line(self) -> str:
        """The final ``stopped:`` / ``error:`` line (one line)."""
        assert self.request is not None
        prefix = "stopped" if self.request.interrupted else "error"
        hint = self.hint()
        return f"{prefix}: {self.request.reason}" + (f"; {hint}" if hint else "")

    def as_error(self) -> SimulationStopped:
        """The exception the engine runner raises for this stop."""
        assert self.request is not None
        self.reported = True  # whoever catches it prints the line
        hint = self.hint()
        message = self.request.reason + (f"; {hint}" if hint else "")
        return SimulationStopped(message, self.request.exit_code, self.request.interrupted)

    # ---------------------------------------------------------------- signals
    def install_signal_handlers(self) -> bool:
        """Handle SIGINT and SIGTERM (main thread only; returns False elsewhere)."""
        if threading.current_thread() is not threading.main_thread():
            return False
        for signum in (signal.SIGINT, signal.SIGTERM):
            self._previous[signum] = signal.getsignal(signum)
            signal.signal(signum, self._on_signal)
        return True

    def restore_signal_handlers(self) -> None:
        """Put back the handlers :meth:`install_signal_handlers` replaced."""
        for signum, handler in self._previous.items():
            with contextlib.suppress(ValueError, TypeError):
                signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self._previous.clear()

    def reinstall_signal_handlers(self) -> None:
        """Re-take SIGINT/SIGTERM (after a library replaced them)."""
        if self._previous and threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                signal.signal(signum, self._on_signal)

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self._wake_main:  # our own wake-up after an engine failure
            self._wake_main = False
            raise EngineInterrupt(self.request.reason if self.request else "stopping")
        name = signal.Signals(signum).name
        if not self.stop(f"interrupted by {name}", 128 + signum, interrupted=True):
            self.hard_exit(f"{name} while stopping; killed the run's processes")
        raise EngineInterrupt(f"interrupted by {name}")

    def _interrupt_main(self) -> None:
        main = threading.main_thread()
        if threading.current_thread() is main or not self._previous or main.ident is None:
            return  # the main thread will see the stop itself (or cannot be woken)
        self._wake_main = True
        with contextlib.suppress(OSError, ValueError):
            signal.pthread_kill(main.ident, signal.SIGINT)

    # -------------------------------------------------------------- processes
    @contextlib.contextmanager
    def subreaper(self) -> Iterator[None]:
        """Inside the block this process is a child subreaper (Linux ``prctl``): a
        process of the run whose parent exits (e.g. an agent of a raylet that Ray's
        shutdown killed) is re-parented to us instead of to init, so it stays among our
        descendants and :meth:`reap` finds it. Elsewhere: no-op."""
        enabled = _set_child_subreaper(True)
        try:
            yield
        finally:
            if enabled:
                _set_child_subreaper(False)

    def _descendant_keys(self) -> set[tuple[int, float]]:
        out = set()
        for proc in self._descendants():
            with contextlib.suppress(psutil.Error):
                out.add((proc.pid, proc.create_time()))
        return out

    def _descendants(self) -> list[psutil.Process]:
        try:
            return self._me.children(recursive=True)
        except psutil.Error:
            return []

    def remember_processes(self) -> None:
        """Note the run's processes (descendants that are new since the guard started).

        Called at stop time and after Ray starts, so processes that get re-parented
        when their parent (e.g. the raylet) exits are still known and can be reaped.
        """
        for proc in self._descendants():
            with contextlib.suppress(psutil.Error):
                key = (proc.pid, proc.create_time())
                if key not in self._baseline:
                    self._known.setdefault(key, proc)

    def run_processes(self) -> list[psutil.Process]:
        """The run's processes that are still alive (zombies among our children, e.g.
        orphans re-parented to us, are reaped on the way)."""
        self.remember_processes()
        alive = []
        for proc in self._known.values():
            with contextlib.suppress(psutil.Error, ChildProcessError):
                if proc.status() == psutil.STATUS_ZOMBIE:
                    if proc.ppid() == self._me.pid:
                        os.waitpid(proc.pid, os.WNOHANG)
                elif proc.is_running():
                    alive.append(proc)
        return alive

    def reap(self, timeout: float = 1.0) -> list[str]:
        """SIGTERM, then SIGKILL, every process of the run still alive.

        Returns:
            ``name(pid)`` of the processes that had to be signalled.
        """
        procs = self.run_processes()
        names = []
        for proc in procs:
            with contextlib.suppress(psutil.Error):
                names.append(f"{proc.name()}({proc.pid})")
                proc.terminate()
        _, alive = psutil.wait_procs(procs, timeout=timeout)
        for proc in alive:
            with contextlib.suppress(psutil.Error):
                proc.kill()
        psutil.wait_procs(alive, timeout=1.0)
        return names

    # ---------------------------------------------------------------- threads
    def join_threads(self, deadline: float) -> list[str]:
        """Wait until ``deadline`` (``time.monotonic``) for the non-daemon threads the
        run started (the ServerApp thread, the engine's workers) to end.

        Returns:
            names of the threads still alive.
        """
        for thread in threading.enumerate():
            if thread is threading.current_thread() or thread.daemon:
                continue
            if thread.ident in self._threads_before:
                continue
            thread.join(max(0.0, deadline - time.monotonic()))
        return [
            t.name
            for t in threading.enumerate()
            if t.is_alive()
            and not t.daemon
            and t.ident not in self._threads_before
            and t is not threading.current_thread()
        ]

    # ------------------------------------------------------------------- exit
    def hard_exit(self, why: str) -> None:
        """Kill the run's processes, print the final line and ``os._exit``."""
        code = self.request.exit_code if self.request else 130
        with contextlib.suppress(Exception):
            self.reap(timeout=1.0)
        if not self.reported:
            with contextlib.suppress(Exception):
                sys.stdout.flush()
                sys.stderr.write(self.line() + f" ({why})\n")
                sys.stderr.flush()
        os._exit(code)

    def done(self, stuck_threads: Iterable[str] = ()) -> None:
        """The orderly stop finished. With no ``stuck_threads`` the watchdog is disarmed;
        otherwise it still forces the exit 2 s later: the interpreter would wait for
        those non-daemon threads before exiting."""
        if not list(stuck_threads):
            self._disarmed.set()
        self.finished.set()

    def _watchdog(self) -> None:
        if self.finished.wait(self.grace) and self._disarmed.wait(2.0):
            return
        self.hard_exit(f"the orderly stop did not finish within {self.grace:.0f} s")


_PR_SET_CHILD_SUBREAPER = 36


def _set_child_subreaper(on: bool) -> bool:
    """``prctl(PR_SET_CHILD_SUBREAPER, on)``; True if it took effect (Linux only)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_CHILD_SUBREAPER, int(on), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


class GuardedGrid(Grid):
    """A ``Grid`` that forwards to another and raises :class:`EngineStopped` on every
    call once the guard is stopping (the ServerApp thread's way out)."""

    def __init__(self, inner: Grid, guard: EngineGuard) -> None:
        self.inner = inner
        self.guard = guard

    @property
    def run(self) -> Any:
        """The inner grid's run."""
        return self.inner.run

    def set_run(self, run: Any) -> None:
        """Forward."""
        self.guard.check()
        self.inner.set_run(run)

    def create_message(self, *args: Any, **kwargs: Any) -> Message:
        """Forward."""
        self.guard.check()
        return self.inner.create_message(*args, **kwargs)

    def get_node_ids(self) -> Iterable[int]:
        """Forward."""
        self.guard.check()
        return self.inner.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Forward."""
        self.guard.check()
        return self.inner.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """Forward."""
        self.guard.check()
        return self.inner.pull_messages(message_ids)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Push, then pull every 0.1 s until every reply arrived, ``timeout`` passed or
        the guard stops (same contract as ``Grid.send_and_receive``)."""
        messages = list(messages)
        ids = set(self.push_messages(messages))
        end = time.monotonic() + (timeout if timeout is not None else 1e12)
        out: list[Message] = []
        while ids and time.monotonic() < end:
            got = list(self.pull_messages(ids))
            for reply in got:
                ids.discard(reply.metadata.reply_to_message_id)
            out.extend(got)
            if ids:
                time.sleep(0.1)
        return out


class _QuietWhileStopping(logging.Filter):
    """Drops the engine's log records once the run is stopping (the actors we kill make
    every in-flight task fail, and flwr logs each with a traceback), and, unless
    ``verbose``, the tracebacks flwr logs when the engine itself fails (``run_api`` and
    ``_main_loop``): that failure becomes one ``error:`` line naming the cause."""

    _ENGINE_LOOPS = ("run_api", "_main_loop")

    def __init__(self, guard: EngineGuard, verbose: bool) -> None:
        super().__init__()
        self.guard = guard
        self.verbose = verbose

    def filter(self, record: logging.LogRecord) -> bool:
        if self.guard.stopping:
            return False
        return self.verbose or record.funcName not in self._ENGINE_LOOPS


@contextlib.contextmanager
def ray_hooks(guard: EngineGuard, verbose: bool = False) -> Iterator[None]:
    """Inside the block, flwr's Ray backend reports to ``guard``.

    * ``RayBackend.init_ray`` runs with ``ray._private.utils.set_sigterm_handler`` a
      no-op, so ``ray.init`` does not replace our SIGTERM handler with its ``sys.exit``;
      the C++ core worker's own SIGTERM handler (a stack dump, then SIGABRT at exit:
      measured) is replaced by ours again afterwards, and the run's new processes are
      remembered.
    * ``RayBackend.process_message`` reports a dead actor (``RayActorError``) as an
      engine failure, which stops the run instead of retrying into a dead actor until the
      timeout.
    * flwr's log records are dropped once the run is stopping (each task killed with
      its actor would log a traceback), and so are, unless ``verbose``, the tracebacks
      of an engine failure (:class:`_QuietWhileStopping`).
    * ``RayBackend.terminate``, when the run is stopping, first kills every actor
      (busy ones too: flwr only ends the idle ones) and waits up to 5 s for the engine's
      worker threads to return from ``ray.get``; a thread still inside ``ray.get`` when
      ``ray.shutdown`` runs never returns (measured: the process then cannot exit).
    """
    import ray
    import ray._private.utils as ray_utils
    from flwr.server.superlink.fleet.vce.backend.raybackend import RayBackend

    original_init = RayBackend.init_ray
    original_process = RayBackend.process_message
    original_terminate = RayBackend.terminate
    in_flight = [0]
    in_flight_lock = threading.Lock()

    def init_ray(self: Any, backend_config: Any) -> None:
        set_handler = ray_utils.set_sigterm_handler
        ray_utils.set_sigterm_handler = lambda handler: None
        try:
            original_init(self, backend_config)
        finally:
            # the core worker installs absl's failure-signal handler for SIGTERM (it
            # prints a stack dump and the process later aborts): take SIGTERM back
            guard.reinstall_signal_handlers()
            ray_utils.set_sigterm_handler = set_handler
            guard.remember_processes()

    def process_message(self: Any, message: Any, context: Any) -> Any:
        with in_flight_lock:
            in_flight[0] += 1
        try:
            return original_process(self, message, context)
        except Exception as err:
            if is_dead_actor_error(err) and not guard.stopping:
                guard.fail(f"a ClientApp actor died ({describe_actor_error(err)})")
            raise
        finally:
            with in_flight_lock:
                in_flight[0] -= 1

    def terminate(self: Any) -> None:
        pool = getattr(self, "pool", None)
        if guard.stopping and pool is not None:
            actors = list(getattr(pool, "pool", [])) + list(
                getattr(pool, "_future_to_actor", {}).values()
            )
            for actor in actors:
                with contextlib.suppress(Exception):
                    ray.kill(actor, no_restart=True)
            deadline = time.monotonic() + 5.0
            while in_flight[0] > 0 and time.monotonic() < deadline:
                time.sleep(0.05)
        original_terminate(self)

    RayBackend.init_ray = init_ray  # type: ignore[method-assign]
    RayBackend.process_message = process_message  # type: ignore[method-assign]
    RayBackend.terminate = terminate  # type: ignore[method-assign]
    flwr_logger = logging.getLogger("flwr")
    quiet = _QuietWhileStopping(guard, verbose)
    flwr_logger.addFilter(quiet)
    try:
        yield
    finally:
        flwr_logger.removeFilter(quiet)
        RayBackend.init_ray = original_init  # type: ignore[method-assign]
        RayBackend.process_message = original_process  # type: ignore[method-assign]
        RayBackend.terminate = original_terminate  # type: ignore[method-assign]


_LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


@contextlib.contextmanager
def loopback_ray() -> Iterator[None]:
    """Inside the block, a Ray started here binds to 127.0.0.1 only.

    Ray's gRPC servers (gcs_server, raylet, every worker's core worker) listen on
    127.0.0.1 only when the node's IP is ``127.0.0.1`` (``GrpcServer``'s
    ``listen_to_localhost_only``), otherwise on ``0.0.0.0``; the dashboard and runtime-env
    agents likewise. But ``ray.init(_node_ip_address="127.0.0.1")`` alone does not do it:
    ``services.resolve_ip_for_localhost`` turns a loopback address into the machine's
    routable one unless ``ray_constants.ENABLE_RAY_CLUSTER`` is False (its default on
    macOS and Windows, from the ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER`` environment variable;
    the variable's only other use is the ``ray start`` command). So the block sets that
    variable to 0 (inherited by Ray's processes) and the already-imported constant to
    False, and restores both afterwards. Verified with ``ss -ltnp`` on ray 2.55.1
    (``tests/integration/test_loopback.py``).
    """
    old_env = os.environ.get(_LOOPBACK_ENV)
    os.environ[_LOOPBACK_ENV] = "0"
    constants = sys.modules.get("ray._private.ray_constants")
    if constants is None:
        import ray._private.ray_constants as constants
    old_value = constants.ENABLE_RAY_CLUSTER
    constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        constants.ENABLE_RAY_CLUSTER = old_value
        if old_env is None:
            os.environ.pop(_LOOPBACK_ENV, None)
        else:
            os.environ[_LOOPBACK_ENV] = old_env
