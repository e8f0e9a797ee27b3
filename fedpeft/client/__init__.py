"""The client half of a strategy (pure tensor logic; no Flower, no transformers)."""

from fedpeft.client.algorithm import (
    ClientAlgorithm,
    ClientAlgorithmBase,
    FullAdapter,
    LocalRound,
    Started,
    finish_with_carry,
    overrides,
)

__all__ = ["ClientAlgorithm", "ClientAlgorithmBase", "FullAdapter", "LocalRound", "Started", "finish_with_carry", "overrides"]
