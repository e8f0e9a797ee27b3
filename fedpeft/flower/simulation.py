"""Running the apps on Flower's simulation engine (Ray backend) from Python."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flwr.simulation import run_simulation

from fedpeft.config import RunConfig
from fedpeft.flower.client_app import make_client_app
from fedpeft.flower.server_app import Observer, make_server_app


def run_simulation_engine(
    flat: Mapping[str, Any], cfg: RunConfig, observer: Observer, num_cpus: int, verbose: bool
) -> None:
    """Run the ServerApp and ``cfg.federation.clients`` virtual SuperNodes.

    ``run_simulation`` passes no run config to the apps, so ``flat`` is bound into both
    (see :func:`~fedpeft.flower.server_app.make_server_app`).
    """
    run_simulation(
        server_app=make_server_app(flat, observer),
        client_app=make_client_app(flat),
        num_supernodes=cfg.federation.clients,
        backend_config={
            "client_resources": {"num_cpus": cfg.simulation.cpus_per_client, "num_gpus": 0.0},
            "init_args": {"num_cpus": num_cpus, "include_dashboard": False},
        },
        verbose_logging=verbose,
    )
