"""The client half of a strategy (pure tensor logic; no Flower, no transformers)."""

from fedpeft.client.algorithm import ClientAlgorithm, FullAdapter, LocalRound

__all__ = ["ClientAlgorithm", "FullAdapter", "LocalRound"]
