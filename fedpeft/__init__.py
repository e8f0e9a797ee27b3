"""fedpeft: federated fine-tuning of foundation models with LoRA, on Flower.

The public API: the three plug-in protocols (``Aggregator``, ``Codec``,
``Selector``) and the client-side ``ClientAlgorithm`` — with ``AggregatorBase`` and
``ClientAlgorithmBase`` declaring every optional hook and its default — the value
types they exchange,
the strategy registry and the typed run config. Flower itself is only touched by
``fedpeft.flower``.
"""

from fedpeft.aggregation import Aggregator, AggregatorBase, WeightedMean, broadcast, weighted_mean
from fedpeft.aggregation.layers import Layer, PadToRank
from fedpeft.aggregation.mean import client_weights
from fedpeft.client import ClientAlgorithm, ClientAlgorithmBase, FullAdapter, LocalRound, Started
from fedpeft.codecs import Codec, CodecContext, Payload, build_codec, register_codec
from fedpeft.config import RunConfig, parse_run_config
from fedpeft.errors import (
    CodecError,
    ConfigError,
    FedPeftError,
    IncompatibleUpdateError,
    RegistryError,
)
from fedpeft.registry import (
    FedStrategy,
    StrategyEnv,
    available_strategies,
    get_strategy,
    register_strategy,
)
from fedpeft.selection import Selector, UniformSelector
from fedpeft.types import AUX_PREFIX, ClientPlan, ClientUpdate, NodeInfo, RoundOutput, TensorDict

__version__ = "0.1.0"

__all__ = [
    "AUX_PREFIX",
    "Aggregator",
    "AggregatorBase",
    "ClientAlgorithm",
    "ClientAlgorithmBase",
    "ClientPlan",
    "ClientUpdate",
    "Codec",
    "CodecContext",
    "CodecError",
    "ConfigError",
    "FedPeftError",
    "FedStrategy",
    "FullAdapter",
    "IncompatibleUpdateError",
    "Layer",
    "LocalRound",
    "NodeInfo",
    "PadToRank",
    "Payload",
    "RegistryError",
    "RoundOutput",
    "RunConfig",
    "Selector",
    "Started",
    "StrategyEnv",
    "TensorDict",
    "UniformSelector",
    "WeightedMean",
    "available_strategies",
    "broadcast",
    "build_codec",
    "client_weights",
    "get_strategy",
    "parse_run_config",
    "register_codec",
    "register_strategy",
    "weighted_mean",
]
