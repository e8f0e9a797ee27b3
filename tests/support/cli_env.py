"""The environment of a ``fedpeft`` CLI subprocess in tests: offline, quiet, isolated."""

from __future__ import annotations

import os
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[2]


def cli_env(flwr_home: pathlib.Path, cache: pathlib.Path) -> dict[str, str]:
    """This process's environment with a fresh ``FLWR_HOME`` and ``FEDPEFT_CACHE``, no
    network, no telemetry, and the checkout on ``PYTHONPATH``."""
    env = dict(os.environ)
    env.update(
        {
            "FLWR_HOME": str(flwr_home),
            "FEDPEFT_CACHE": str(cache),
            "HF_HUB_OFFLINE": "1",
            "FLWR_TELEMETRY_ENABLED": "0",
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
            "PYTHONPATH": str(ROOT),
        }
    )
    return env
