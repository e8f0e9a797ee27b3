"""Server-side aggregation layers (no Flower import)."""

from fedpeft.aggregation.base import Aggregator, broadcast
from fedpeft.aggregation.mean import WeightedMean, weighted_mean

__all__ = ["Aggregator", "WeightedMean", "broadcast", "weighted_mean"]
