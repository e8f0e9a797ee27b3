"""Known third-party noise that fedpeft hides from its output (``--verbose`` shows it).

Every entry below is matched by its exact text *and* its origin (the logger that logs
it, or the module that raises it): nothing else from these libraries is hidden, and
nothing fedpeft says (logger ``fedpeft``, warnings raised from ``fedpeft`` modules)
ever is.

1. ``DEPRECATED FEATURE: The `run_simulation` function is deprecated …`` — a WARNING
   record of Flower's logger ``flwr``, logged by ``flwr.simulation.run_simulation`` at
   every call (the driver, once per run). Harmless: fedpeft calls ``run_simulation`` on
   purpose, in one place (``fedpeft.flower.simulation.start_flower_simulation``, which
   says why and what replaces it); the function works as documented in flwr 1.41.
2. ``Manually terminating ClientAppActor`` — a WARNING record of the logger ``flwr``,
   logged by ``VirtualClientEngineActor.terminate`` in every Ray actor when the engine
   ends its actor pool, i.e. at the normal end of every run (Ray forwards it to the
   terminal as ``(ClientAppActor pid=…) WARNING: Manually terminating ClientAppActor``).
   Harmless: it is the orderly shutdown, not a failure; an actor that really dies is
   reported by fedpeft itself (``error: a ClientApp actor died …``).
3. ``FutureWarning: `is_gradient_checkpointing` is deprecated and will be removed in
   v6 …`` — raised by ``transformers.modeling_utils`` when peft's ``get_peft_model``
   reads that property, once per process that builds a model (the driver and every
   ClientApp actor). Harmless: a deprecated alias read by peft, not by fedpeft, that
   still returns the right value; nothing to act on until transformers v6.

How the filter reaches every process: :func:`install` (called by the ``fedpeft``
command) adds the warning filters and a log filter (:class:`KnownNoise`) to this
process and puts the warning filters in ``PYTHONWARNINGS``, which child processes
inherit (Ray's raylet and its workers, ``deploy-local``'s SuperLink and SuperNodes).
The simulation engine also calls :func:`install` inside every ClientApp actor (a
ClientApp lifespan, see ``fedpeft.flower.simulation``), since a log filter cannot travel
through the environment.

A ``-W`` option or a ``PYTHONWARNINGS`` of your own takes precedence: fedpeft then
leaves Python's warning filters alone (the log filter still applies; ``--verbose``
drops it too).

This module imports only the standard library (it runs first, in every process).
"""

from __future__ import annotations

import logging
import os
import re
import sys
import warnings
from dataclasses import dataclass

__all__ = [
    "NOISY_LOGS",
    "NOISY_WARNINGS",
    "KnownNoise",
    "NoisyLog",
    "NoisyWarning",
    "install",
    "pythonwarnings",
]


@dataclass(frozen=True)
class NoisyLog:
    """A log record to drop: logged on ``logger`` (exactly), its text starting with
    ``text``."""

    logger: str
    text: str


@dataclass(frozen=True)
class NoisyWarning:
    """A warning to ignore: ``category`` raised from ``module`` (exactly), its message
    starting with ``text`` (no ``:`` or ``,``: it must fit in ``PYTHONWARNINGS``)."""

    text: str
    category: type[Warning]
    module: str


NOISY_LOGS = (
    NoisyLog("flwr", "DEPRECATED FEATURE: The `run_simulation` function is deprecated"),
    NoisyLog("flwr", "Manually terminating ClientAppActor"),
)
NOISY_WARNINGS = (
    NoisyWarning(
        "`is_gradient_checkpointing` is deprecated", FutureWarning, "transformers.modeling_utils"
    ),
)


class KnownNoise(logging.Filter):
    """Drops the records of :data:`NOISY_LOGS` (only those, only from their logger)."""

    def filter(self, record: logging.LogRecord) -> bool:
        noisy = [n for n in NOISY_LOGS if n.logger == record.name]
        if not noisy:
            return True
        try:
            text = record.getMessage().lstrip()
        except Exception:  # noqa: BLE001 - a malformed record is not ours to drop
            return True
        return not any(text.startswith(n.text) for n in noisy)


def pythonwarnings() -> str:
    """:data:`NOISY_WARNINGS` in ``PYTHONWARNINGS`` syntax (comma-separated filters)."""
    return ",".join(f"ignore:{w.text}:{w.category.__name__}:{w.module}" for w in NOISY_WARNINGS)


_FILTER = KnownNoise()


def install(verbose: bool = False) -> None:
    """Hide :data:`NOISY_LOGS` and :data:`NOISY_WARNINGS` in this process and in the
    processes it starts from now on; ``verbose``: do nothing (show everything).

    Idempotent. Python's warning filters (here and, through ``PYTHONWARNINGS``, in child
    processes) are left alone when the user set their own (``-W``, ``PYTHONWARNINGS``).
    """
    if verbose:
        return
    for name in {n.logger for n in NOISY_LOGS}:
        logger = logging.getLogger(name)
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)
    ours = pythonwarnings()
    if sys.warnoptions or os.environ.get("PYTHONWARNINGS", ours) != ours:
        return  # the user's own filters (or ours, inherited at startup) are in force
    for w in NOISY_WARNINGS:
        warnings.filterwarnings(
            "ignore",
            message=re.escape(w.text),
            category=w.category,
            module=re.escape(w.module) + r"\Z",  # as PYTHONWARNINGS matches it
        )
    os.environ["PYTHONWARNINGS"] = ours
