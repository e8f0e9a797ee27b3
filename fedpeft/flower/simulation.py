"""Running the apps on Flower's simulation engine (Ray backend) from Python.

Scale note (measured with flwr 1.41, see ``docs/scale.md``): the engine's message
extractor (``vce_api.add_messages_to_queue``) asks the in-memory link state for one
message *per registered node* every 0.1 s, and each of those calls scans every stored
instruction. With 1,000 virtual nodes that is O(nodes × messages) work per sweep on
the driver (``simulations/bench_extractor.py`` measures it side by side: 52 s vs 40 s
before the first round, 1.27× the wall time of a short run). :func:`fast_extractor`
replaces the extractor for the duration of a run with one that first finds which
nodes have undelivered messages (one pass over the store) and polls only those,
through the same public ``get_message_ins`` call (TTL checks and delivery marking
unchanged). If the link state does not look as expected, the original runs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import pathlib
import shlex
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from queue import Queue
from typing import Any

from flwr.app import Context
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.simulation import run_simulation

from fedpeft import quiet
from fedpeft.config import RunConfig
from fedpeft.errors import ConfigError, FedPeftError
from fedpeft.flower.client_app import make_client_app
from fedpeft.flower.engine_guard import (
    EngineGuard,
    EngineStopped,
    GuardedGrid,
    loopback_ray,
    ray_hooks,
    root_cause,
)
from fedpeft.flower.server_app import make_server_app
from fedpeft.server.listeners import Observer
from fedpeft.server.setup import checkpoint_dir, resolve_output_dir

log = logging.getLogger("fedpeft")


def pending_node_ids(state: Any) -> list[int] | None:
    """Destination nodes of undelivered instructions, in store order, or ``None``
    when ``state`` is not an in-memory link state this module understands."""
    store = getattr(state, "message_ins_store", None)
    lock = getattr(state, "lock", None)
    if not isinstance(store, dict) or lock is None:
        return None
    with lock:
        messages = list(store.values())
    seen: dict[int, None] = {}
    for msg in messages:
        meta = msg.metadata
        if meta.delivered_at == "":
            seen.setdefault(int(meta.dst_node_id), None)
    return list(seen)


def make_extractor(original: Callable[..., None], interval: float = 0.1) -> Callable[..., None]:
    """An ``add_messages_to_queue`` that polls only nodes with pending messages.

    Same contract as flwr's: loop until ``f_stop``; each sweep moves at most one
    undelivered message per node into ``queue``, then waits ``interval`` seconds.
    """

    def add_messages_to_queue(
        state: Any, queue: Queue[Any], nodes_mapping: Mapping[int, int], f_stop: threading.Event
    ) -> None:
        if pending_node_ids(state) is None:
            log.warning("simulation: unknown link state %s; using Flower's extractor", type(state))
            original(state, queue, nodes_mapping, f_stop)
            return
        while not f_stop.is_set():
            for node_id in pending_node_ids(state) or []:
                if node_id not in nodes_mapping:
                    continue
                for msg in state.get_message_ins(node_id=node_id, limit=1):
                    queue.put(msg)
            f_stop.wait(interval)

    return add_messages_to_queue


@contextlib.contextmanager
def fast_extractor() -> Iterator[None]:
    """Use :func:`make_extractor`'s extractor inside the block (restored after)."""
    from flwr.server.superlink.fleet.vce import vce_api

    original = vce_api.add_messages_to_queue
    vce_api.add_messages_to_queue = make_extractor(original)  # type: ignore[assignment]
    try:
        yield
    finally:
        vce_api.add_messages_to_queue = original  # type: ignore[assignment]


def check_resources(cfg: RunConfig, num_cpus: int) -> None:
    """Refuse, before Ray starts, a ClientApp that needs more CPUs (or GPUs) than the
    simulation has.

    Ray would start, build an empty actor pool (``ActorPool is empty``) and leave the
    ServerApp waiting for replies until the timeout.

    Raises:
        ConfigError: ``simulation.cpus-per-client`` is more than ``num_cpus``, or
            ``simulation.gpus-per-client`` asks for GPUs this machine does not have.
    """
    gpus = cfg.simulation.gpus_per_client
    if gpus > 0:
        import torch

        if not torch.cuda.is_available():
            raise ConfigError(
                f"simulation.gpus-per-client={gpus:g} but torch {torch.__version__} sees no CUDA "
                "device here; Ray would find no GPU and no client could start. Set it to 0"
            )
        if gpus > torch.cuda.device_count():
            raise ConfigError(
                f"simulation.gpus-per-client={gpus:g} is more than the {torch.cuda.device_count()} "
                "GPU(s) of this machine; no client could start"
            )
    if cfg.simulation.cpus_per_client > num_cpus:
        source = (
            f"simulation.num-cpus={cfg.simulation.num_cpus}"
            if cfg.simulation.num_cpus
            else "all cores of this machine (simulation.num-cpus=0)"
        )
        raise ConfigError(
            f"simulation.cpus-per-client ({cfg.simulation.cpus_per_client}) is more than the "
            f"{num_cpus} CPUs the simulation may use ({source}); no client could start. "
            f"Lower simulation.cpus-per-client to at most {num_cpus}"
        )


def backend_config(cfg: RunConfig, num_cpus: int) -> dict[str, Any]:
    """The Ray backend config: ``simulation.cpus-per-client`` CPUs per ClientApp
    actor out of ``num_cpus`` (2 cores, 1 per client → two clients train at once).

    Ray always starts a new local instance (``address="local"``: never joins a cluster
    named by ``RAY_ADDRESS``), with no dashboard, on the loopback address (see
    :func:`~fedpeft.flower.engine_guard.loopback_ray` for why the address alone is not
    enough).
    """
    gpus = cfg.simulation.gpus_per_client
    init_gpus: dict[str, Any] = {}
    if gpus > 0:
        import torch

        init_gpus["num_gpus"] = torch.cuda.device_count()
    return {
        "client_resources": {"num_cpus": cfg.simulation.cpus_per_client, "num_gpus": float(gpus)},
        "init_args": {
            **init_gpus,
            "num_cpus": num_cpus,
            "include_dashboard": False,
            "address": "local",
            "_node_ip_address": "127.0.0.1",
        },
    }


def resume_hint(cfg: RunConfig, out_dir: pathlib.Path) -> str:
    """Where the last complete checkpoint of a stopped run is and how to resume it."""
    if not cfg.checkpoint.every:
        return (
            "checkpoint.every is 0, so there is no checkpoint to resume from; "
            f"partial results are in {out_dir}"
        )
    ckpt = checkpoint_dir(
        dataclasses.replace(cfg, output=dataclasses.replace(cfg.output, dir=str(out_dir)))
    )
    try:
        name = (ckpt / "LATEST").read_text().strip()
        done = int(name.rsplit("-", 1)[1])
    except (OSError, ValueError, IndexError):
        return (
            "no round had completed, so there is no checkpoint; "
            "run the same command again to start over"
        )
    return (
        f"the last complete checkpoint is round {done} of {cfg.federation.rounds} ({ckpt / name}); "
        f"resume with: fedpeft simulate --resume {shlex.quote(str(out_dir))}"
    )


def guarded_server_app(
    flat: Mapping[str, Any], observer: Observer, guard: EngineGuard
) -> ServerApp:
    """:func:`~fedpeft.flower.server_app.make_server_app`'s app, run on a
    :class:`~fedpeft.flower.engine_guard.GuardedGrid` (so it ends when ``guard`` stops)."""
    inner = make_server_app(flat, observer)
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        guard.server_thread = threading.current_thread()
        inner(grid=GuardedGrid(grid, guard), context=context)

    return app


def quiet_client_app(flat: Mapping[str, Any], verbose: bool) -> ClientApp:
    """:func:`~fedpeft.flower.client_app.make_client_app`'s app; unless ``verbose``,
    with a lifespan that installs :mod:`fedpeft.quiet`'s filters in the process running
    it (each Ray actor, before its first message): a log filter cannot reach the actors
    through the environment, and the actor's own ``Manually terminating`` record is
    logged there. (``make_client_app`` sets no lifespan, so none is replaced.)"""
    app = make_client_app(flat)
    if not verbose:

        @app.lifespan()
        def quiet_actor(context: Context) -> Iterator[None]:
            quiet.install()
            yield

    return app


def start_flower_simulation(
    server_app: ServerApp,
    client_app: ClientApp,
    num_supernodes: int,
    backend_config: Mapping[str, Any],
    verbose: bool,
) -> None:
    """The one call of flwr's ``run_simulation``, which flwr 1.41 marks deprecated.

    Why it is still used: its replacement is ``flwr run`` (a SuperLink that runs the
    packaged app, in flwr 1.41 through ``flwr.simulation.run_simulation_process`` and
    the SimulationIo API), which loads the ServerApp and ClientApp from their import
    paths in processes of its own. A run here needs apps bound to objects of this
    process (the progress observer, the :class:`EngineGuard` that stops the run, the
    run's config bound into both apps, ``ray_hooks`` on this process's Ray backend), and
    the code under ``run_simulation`` (``_run_simulation``) is private. ``fedpeft
    deploy-local`` already runs the same apps through ``flwr run``. When
    ``run_simulation`` goes away, this function is what to replace: e.g. by ``flwr run``
    on a local SuperLink with the simulation runtime, the progress display following the
    run's ``metrics.csv`` and a stop going through ``flwr stop``.

    Unless ``verbose``, the deprecation banner it logs at every call (and only the
    records listed in :mod:`fedpeft.quiet`) is dropped.
    """
    flwr_logger = logging.getLogger("flwr")
    banner = quiet.KnownNoise()
    if not verbose:
        flwr_logger.addFilter(banner)
    try:
        run_simulation(
            server_app=server_app,
            client_app=client_app,
            num_supernodes=num_supernodes,
            backend_config=dict(backend_config),  # type: ignore[arg-type]
            verbose_logging=verbose,
        )
    finally:
        flwr_logger.removeFilter(banner)


_FLWR_ENGINE_ERROR = "An error was encountered. Ending simulation."


def run_simulation_engine(
    flat: Mapping[str, Any],
    cfg: RunConfig,
    observer: Observer,
    num_cpus: int,
    verbose: bool,
    grace: float = 15.0,
) -> None:
    """Run the ServerApp and ``cfg.federation.clients`` virtual SuperNodes.

    ``run_simulation`` passes no run config to the apps, so ``flat`` is bound into both
    (see :func:`~fedpeft.flower.server_app.make_server_app`).

    Stopping (see :mod:`fedpeft.flower.engine_guard`): SIGINT/SIGTERM (when called from
    the main thread), an engine that fails, or a ClientApp actor that dies ends the run
    within seconds: the ServerApp thread leaves at its next grid call, Ray is shut down,
    the run's processes are killed if still alive, and :class:`SimulationStopped` is
    raised with the last checkpoint and the resume command. If that orderly stop takes
    longer than ``grace`` seconds, the process exits (``os._exit``) with the same line.

    Raises:
        ConfigError: ``simulation.cpus-per-client`` is more than ``num_cpus``, or
            ``simulation.gpus-per-client`` asks for GPUs this machine does not have.
        SimulationStopped: the run was interrupted (``exit_code`` 130/143) or the engine
            failed (``exit_code`` 2).
        FedPeftError: the ServerApp stopped with an error (e.g. a round failed).
    """
    check_resources(cfg, num_cpus)
    out_dir = pathlib.Path(flat.get("output.dir") or resolve_output_dir(cfg))
    guard = EngineGuard(grace=grace, hint=lambda: resume_hint(cfg, out_dir))
    guard.install_signal_handlers()
    try:
        with guard.subreaper():
            _run_guarded(flat, cfg, observer, num_cpus, verbose, guard)
            if guard.stopping:
                _stop_engine(guard)  # our handlers stay: a second signal exits at once
    finally:
        guard.restore_signal_handlers()
    if guard.stopping:
        raise guard.as_error()


def _run_guarded(
    flat: Mapping[str, Any],
    cfg: RunConfig,
    observer: Observer,
    num_cpus: int,
    verbose: bool,
    guard: EngineGuard,
) -> None:
    """:func:`start_flower_simulation` under ``guard``; an interruption or engine
    failure is turned into a stop request (``guard.stopping``) instead of an exception."""
    try:
        with loopback_ray(), ray_hooks(guard, verbose), fast_extractor():
            start_flower_simulation(
                server_app=guarded_server_app(flat, observer, guard),
                client_app=quiet_client_app(flat, verbose),
                num_supernodes=cfg.federation.clients,
                backend_config=backend_config(cfg, num_cpus),
                verbose=verbose,
            )
    except KeyboardInterrupt:
        # our handlers raise EngineInterrupt (a KeyboardInterrupt) after recording why;
        # anything else (a handler we did not install) is a plain interruption
        guard.stop("interrupted", 130, interrupted=True)
    except SystemExit as err:  # flwr_exit (e.g. the ray extra missing)
        guard.stop(f"the simulation engine exited (status {err.code})", 2, interrupted=False)
    except EngineStopped:
        pass  # the ServerApp thread saw the stop; guard.request says why
    except FedPeftError:
        if not guard.stopping:
            raise  # the ServerApp's own error (e.g. a round failed); it has ended
    except Exception as err:  # noqa: BLE001 - the engine's failures become one error line
        server_alive = guard.server_thread is not None and guard.server_thread.is_alive()
        if not guard.stopping and str(err) != _FLWR_ENGINE_ERROR and not server_alive:
            raise  # a bug in the ServerApp, which has ended: keep the traceback
        cause = root_cause(err)
        guard.stop(
            f"the simulation engine failed: {type(cause).__name__}: {str(cause).strip()[:300]}",
            2,
            interrupted=False,
        )


def _stop_engine(guard: EngineGuard) -> None:
    """Shut Ray down, wait for the run's threads, kill the run's processes still alive."""
    deadline = time.monotonic() + max(1.0, guard.grace - 5.0)
    guard.remember_processes()  # before Ray's shutdown orphans any of them
    try:
        import ray

        ray.shutdown()  # idempotent; the engine's own ``finally`` usually did it already
    except Exception as err:  # noqa: BLE001 - cleanup goes on regardless
        log.debug("ray.shutdown failed while stopping: %s", err)
    stuck = guard.join_threads(deadline)
    killed = guard.reap()
    if killed:
        log.debug("killed %d leftover processes: %s", len(killed), ", ".join(killed))
    if stuck:
        log.warning("threads still running after the stop: %s", ", ".join(stuck))
    guard.done(stuck)
