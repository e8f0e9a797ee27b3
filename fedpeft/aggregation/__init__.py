"""Server-side aggregation layers (no Flower import)."""

from fedpeft.aggregation.base import Aggregator, AggregatorBase, broadcast
from fedpeft.aggregation.mean import WeightedMean, weighted_mean

__all__ = ["Aggregator", "AggregatorBase", "WeightedMean", "broadcast", "weighted_mean"]
