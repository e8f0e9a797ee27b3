"""Flower's ``flwr-clientapp`` run in a forked child of a warm zygote.

The zygote (:mod:`fedpeft.deploy.zygote`, transport-agnostic) calls three hooks,
which live here because they touch flwr:

* :func:`preload` — once, in the zygote: pin torch to one thread *before any torch
  op* (torch's CPU wheel uses GNU libgomp, whose thread pool does not survive
  ``fork``; with one thread no pool is ever created), then import torch,
  transformers, peft and Flower's ClientApp runtime (≈ 4–6 s a cold process pays per
  message, FLOWER.md §9.1);
* :func:`child_main` — in each forked child: set the thread count a fresh process
  would have (``OMP_NUM_THREADS`` of the launcher, else torch's default), then run
  Flower's own ``flwr-clientapp`` main unchanged, with two observers patched into
  ``flwr.supernode.runtime.run_clientapp``: one notes the run, one chooses which app
  modules the child may reuse (below) and, after the ClientApp answered, asks the
  zygote to warm what the app says it needs (``warm_hint``);
* :func:`warm` — in the zygote, between messages: import the app *from the installed
  FAB* (as ``flwr-clientapp`` would) and call its ``warm(hint)`` (for fedpeft:
  :func:`fedpeft.flower.client_app.warm` builds the model and the node's data
  through the same per-process cache the handlers use), so later forks find them in
  memory, copy-on-write.

What a child may reuse: the app's modules (and hence its per-process caches) only if
the zygote imported them for the same FAB directory (FAB id, version and hash) *and*
the same run id; otherwise every module of the app's top-level packages is dropped
from ``sys.modules`` before Flower loads the ClientApp, so the child imports the
FAB's code and builds its task exactly as a fresh process does (the first message of
a run pays the normal cost, never a stale task). Inside a run the cache keys
themselves decide: a message whose config, model or partition differs from what was
warmed misses the cache and builds its own.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import socket
import sys
from collections.abc import Callable, Mapping
from typing import Any

SOCKET_ENV = "FEDPEFT_ZYGOTE_SOCKET"
"""Same name as :data:`fedpeft.deploy.zygote.SOCKET_ENV` (not imported: this module
must not import fedpeft after the zygote dropped fedpeft's modules)."""

_STATE: dict[str, Any] = {
    "default_threads": None,  # torch's thread count before preload pinned it to 1
    "project": None,  # FAB directory the zygote's app modules come from
    "run_id": None,  # the run they were warmed for
    "hints": [],  # JSON of every hint warmed for that run
    "paths": [],  # the FAB directory this module put on sys.path
}
TIMINGS_ENV = "FEDPEFT_CLIENT_TIMINGS"
"""Same as :data:`fedpeft.timings.ENV`: if set to a file, a child appends
``child-start``, ``task-pulled`` and ``app-loaded`` (with ``reused``) lines there,
beside the handler's own phases (benchmarks only)."""


def preload() -> None:
    """Zygote start-up: one torch thread, then the heavy imports (no torch op before)."""
    import torch

    _STATE["default_threads"] = torch.get_num_threads()  # reads OMP_NUM_THREADS; no pool
    torch.set_num_threads(1)
    import flwr.app  # noqa: F401
    import flwr.cli.install  # noqa: F401
    import flwr.clientapp  # noqa: F401
    import flwr.supernode.cli.flwr_clientapp  # noqa: F401
    import flwr.supernode.runtime.run_clientapp  # noqa: F401

    from fedpeft.tasks import import_libraries

    import_libraries()  # transformers, peft, safetensors
    with contextlib.suppress(Exception):
        import tqdm

        tqdm.tqdm.monitor_interval = 0  # no monitor thread: the zygote must stay 1-thread


# -- app modules ---------------------------------------------------------------------


def app_packages(project: pathlib.Path) -> set[str]:
    """Top-level module names an app directory provides (``fedpeft``, ``strategies``, …)."""
    names = set()
    with contextlib.suppress(Exception):
        for entry in project.iterdir():
            if entry.is_dir() and (entry / "__init__.py").exists():
                names.add(entry.name)
            elif entry.suffix == ".py":
                names.add(entry.stem)
    return names


def forget_modules(names: set[str]) -> int:
    """Drop every module of the top-level packages ``names`` from ``sys.modules``.

    Running code keeps its module globals; the next ``import`` reads the files again.
    """
    dropped = [m for m in sys.modules if m.split(".", 1)[0] in names]
    for name in dropped:
        del sys.modules[name]
    return len(dropped)


def _under(module: Any, directory: pathlib.Path) -> bool:
    path = getattr(module, "__file__", None)
    return bool(path) and pathlib.Path(path).resolve().is_relative_to(directory.resolve())


def use_project(project: pathlib.Path, keep: bool) -> None:
    """Make ``import`` of the app's packages resolve to ``project`` (the installed FAB).

    ``keep``: reuse modules already imported from ``project``; otherwise drop them too
    (a fresh import, as in a new process). Modules of those packages imported from
    anywhere else (e.g. fedpeft's own installation, which the zygote itself runs from)
    are always dropped, and a FAB directory put on ``sys.path`` before leaves it.
    """
    names = app_packages(project)
    foreign = {
        m.split(".", 1)[0]
        for m, mod in list(sys.modules.items())
        if m.split(".", 1)[0] in names and not (keep and _under(mod, project))
    }
    forget_modules(foreign)
    stale = set(_STATE["paths"]) - {str(project)}  # FAB directories inserted before
    sys.path[:] = [p for p in sys.path if p not in stale]
    if str(project) not in sys.path:
        sys.path.insert(0, str(project))
    _STATE["paths"] = [str(project)]


def _app_module(project: pathlib.Path) -> str:
    """The module of the app's ClientApp (``[tool.flwr.app.components] clientapp``)."""
    import tomllib

    with (project / "pyproject.toml").open("rb") as handle:
        ref = tomllib.load(handle)["tool"]["flwr"]["app"]["components"]["clientapp"]
    return str(ref).partition(":")[0]


# -- zygote side -----------------------------------------------------------------------


def warm(request: dict[str, Any]) -> dict[str, Any]:
    """Build what ``request["hint"]`` names with the app of ``request["project"]``.

    A new FAB directory or run id first drops everything warmed before.
    """
    import importlib

    project = pathlib.Path(request["project"])
    run_id = int(request["run_id"])
    same = (_STATE["project"], _STATE["run_id"]) == (str(project), run_id)
    if not same:
        _STATE.update(project=None, run_id=None, hints=[])
    use_project(project, keep=same)
    module = importlib.import_module(_app_module(project))
    warm_fn: Callable[[Mapping[str, Any]], None] | None = getattr(module, "warm", None)
    key = json.dumps(request["hint"], sort_keys=True)
    if warm_fn is not None and key not in _STATE["hints"]:
        warm_fn(request["hint"])
        _STATE["hints"] = [*_STATE["hints"], key]
    _STATE.update(project=str(project), run_id=run_id)
    return {"project": str(project), "run_id": run_id, "hints": len(_STATE["hints"])}


# -- child side ------------------------------------------------------------------------


def _timing(event: str, **extra: Any) -> None:
    path = os.environ.get(TIMINGS_ENV)
    if not path:
        return
    import time

    with contextlib.suppress(Exception), open(path, "a") as handle:
        line = {"pid": os.getpid(), "event": event, "time": time.time(), **extra}
        handle.write(json.dumps(line) + "\n")


def _ask_warm(project: pathlib.Path, run_id: int, hint: Mapping[str, Any]) -> None:
    """Fire-and-forget: ask the zygote to warm ``hint`` (nothing if it already did)."""
    path = os.environ.get(SOCKET_ENV)
    key = json.dumps(hint, sort_keys=True)
    same = (_STATE["project"], _STATE["run_id"]) == (str(project), run_id)
    if not path or (same and key in _STATE["hints"]):
        return
    request = {"project": str(project), "run_id": run_id, "hint": hint}
    with (
        contextlib.suppress(Exception),
        socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as sock,
    ):
        sock.settimeout(2.0)
        sock.connect(path)
        sock.send(json.dumps({"op": "warm", "request": request}).encode())


class _Observed:
    """The loaded ClientApp, plus: compute the app's warm hint, then ask for it."""

    def __init__(self, app: Any, project: pathlib.Path, run_id: int, warm_hint: Any) -> None:
        self.app, self.project, self.run_id, self.warm_hint = app, project, run_id, warm_hint

    def __call__(self, message: Any, context: Any) -> Any:
        hint = None
        if self.warm_hint is not None:
            with contextlib.suppress(Exception):
                hint = self.warm_hint(message, context)
        try:
            return self.app(message=message, context=context)
        finally:
            if hint is not None:
                _ask_warm(self.project, self.run_id, hint)


def child_main(argv: list[str]) -> int:
    """Run Flower's ``flwr-clientapp`` main in a forked child (argv/env/fds already set)."""
    _timing("child-start", warm_run=_STATE["run_id"])
    import torch

    threads = os.environ.get("OMP_NUM_THREADS", "")
    torch.set_num_threads(
        int(threads) if threads.isdigit() and int(threads) > 0 else _STATE["default_threads"] or 1
    )
    from flwr.common.config import get_project_dir
    from flwr.supernode.cli.flwr_clientapp import flwr_clientapp
    from flwr.supernode.runtime import run_clientapp as runtime

    seen: dict[str, Any] = {}
    pull_task_input, get_load = runtime.pull_task_input, runtime.get_load_client_app_fn

    def pull(client: Any) -> Any:
        message, context, run, fab = pull_task_input(client)
        seen["run_id"] = int(run.run_id)
        _timing("task-pulled")
        return message, context, run, fab

    def get_load_client_app_fn(default_app_ref: str, app_path: str | None, multi_app: bool) -> Any:
        load = get_load(default_app_ref, app_path, multi_app)

        def _load(fab_id: str, fab_version: str, fab_hash: str) -> Any:
            if not multi_app or app_path is not None:  # not how a SuperNode runs us
                return load(fab_id, fab_version, fab_hash)
            project = pathlib.Path(get_project_dir(fab_id, fab_version, fab_hash))
            run_id = int(seen.get("run_id", -1))
            reuse = (_STATE["project"], _STATE["run_id"]) == (str(project), run_id)
            use_project(project, keep=reuse)
            app = load(fab_id, fab_version, fab_hash)
            module = sys.modules.get(_app_module(project))
            _timing("app-loaded", reused=reuse)
            return _Observed(app, project, run_id, getattr(module, "warm_hint", None))

        return _load

    runtime.pull_task_input = pull
    runtime.get_load_client_app_fn = get_load_client_app_fn
    flwr_clientapp()
    return 0
