"""The server side of a run with no Flower import: setup, the round engine, listeners,
and the run around them (``ServerRun``).

:mod:`fedpeft.flower.server_app` drives it through Flower's strategy interface; tests
drive it directly (``tests/test_engine.py``).
"""

from fedpeft.server.engine import (
    BudgetExhausted,
    ClientStateUnreadable,
    Outgoing,
    Reply,
    RoundEngine,
    RoundFailed,
    RoundResult,
    RoundWork,
    ServerState,
)
from fedpeft.server.listeners import Checkpointer, Observer, Progress, ResultsWriter, RoundListener
from fedpeft.server.run import ServerRun
from fedpeft.server.setup import build_strategy, checkpoint_dir, resolve_output_dir, strategy_env

__all__ = [
    "BudgetExhausted",
    "Checkpointer",
    "ClientStateUnreadable",
    "Observer",
    "Outgoing",
    "Progress",
    "Reply",
    "ResultsWriter",
    "RoundEngine",
    "RoundFailed",
    "RoundListener",
    "RoundResult",
    "RoundWork",
    "ServerRun",
    "ServerState",
    "build_strategy",
    "checkpoint_dir",
    "resolve_output_dir",
    "strategy_env",
]
