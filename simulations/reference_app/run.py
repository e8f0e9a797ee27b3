"""Run the reference app on Flower's simulation engine: ``python -m reference_app.run CONFIG.json``.

Same engine and resources as ``fedpeft simulate`` (``run_simulation``, Ray backend,
one CPU per ClientApp actor out of every core). ``simulations/`` must be on
``PYTHONPATH`` so the Ray actors can import ``reference_app``.
"""

from __future__ import annotations

import logging
import os
import pathlib
import sys


def main() -> None:
    """Parse the config file named on the command line and run the simulation."""
    for key, value in {
        "FLWR_TELEMETRY_ENABLED": "0",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
    }.items():
        os.environ.setdefault(key, value)
    from flwr.simulation import run_simulation

    from reference_app.client_app import make_client_app
    from reference_app.server_app import make_server_app
    from reference_app.task import RefConfig

    if len(sys.argv) != 2:
        raise SystemExit("usage: python -m reference_app.run CONFIG.json")
    cfg = RefConfig.from_json(pathlib.Path(sys.argv[1]).read_text())
    logging.getLogger("flwr").setLevel(logging.WARNING)
    run_simulation(
        server_app=make_server_app(cfg),
        client_app=make_client_app(cfg),
        num_supernodes=cfg.clients,
        backend_config={
            "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
            "init_args": {"num_cpus": os.cpu_count() or 1, "include_dashboard": False},
        },
    )
    if not (pathlib.Path(cfg.out) / "summary.json").exists():
        raise SystemExit(
            f"the reference run ended without {cfg.out}/summary.json; see the log above"
        )


if __name__ == "__main__":
    main()
