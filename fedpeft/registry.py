"""The strategy registry: string keys, open to outside packages.

A strategy is registered with a frozen config dataclass (its options, read from the
run-config section named after the strategy, e.g. ``lora-fair.lambda``) and a
``build`` function that turns that config into a :class:`FedStrategy`::

    @dataclass(frozen=True)
    class MyConfig:
        server_lr: float = 1.0

    def build(config: MyConfig, env: StrategyEnv) -> FedStrategy:
        return FedStrategy(aggregator=MyAggregator(config.server_lr))

    register_strategy("my-method", config_cls=MyConfig, build=build)

and selected with ``strategy.name = "my-method"`` (or ``--strategy my-method``).

The registry knows no strategy by name: built-in and outside strategies alike are
found through ``fedpeft.plugins`` entry points (:mod:`fedpeft.plugins`).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fedpeft.aggregation.base import Aggregator
from fedpeft.client.algorithm import ClientAlgorithm, FullAdapter
from fedpeft.errors import RegistryError
from fedpeft.lora.peft_io import AdapterLayout
from fedpeft.selection.base import Selector


@dataclass(frozen=True)
class StrategyEnv:
    """Run-level facts a strategy's ``build`` may use besides its own config.

    Attributes:
        seed: the run seed.
        num_rounds: rounds in the run.
        clients_per_round: nodes sampled per round.
        rank: the configured LoRA rank (``lora.r``).
        ranks: per-client ranks (``lora.ranks``), empty when all share ``rank``.
        lora_alpha: LoRA α; the scaling of a rank-``r`` adapter is ``α / r``.
        use_rslora: rank-stabilised scaling ``α / √r``.
    """

    seed: int
    num_rounds: int
    clients_per_round: int
    rank: int
    ranks: tuple[int, ...] = ()
    lora_alpha: float = 16.0
    use_rslora: bool = False

    @property
    def layout(self) -> AdapterLayout:
        """The adapter layout (scaling ``α / r`` or ``α / √r``) every strategy uses."""
        return AdapterLayout(lora_alpha=self.lora_alpha, use_rslora=self.use_rslora)


@dataclass(frozen=True)
class FedStrategy:
    """The composition root a registered strategy builds.

    Attributes:
        aggregator: the server half (``fedpeft.aggregation.Aggregator``).
        client: the client half (``fedpeft.client.ClientAlgorithm``).
        selector: who trains each round with which plan; ``None`` means uniform
            sampling with the configured rank(s).
        lossy_codecs: whether lossy wire codecs may be used with this strategy. A
            strategy that needs the exact client tensors sets ``False`` and a lossy
            ``codec.uplink`` is then refused at config time.
        needs_individual_updates: the server needs each client's update, not just
            their sum, so sum-only secure aggregation cannot serve it.
        mixed_ranks: the strategy accepts clients of different ranks.
        dp_compatible: clients upload the whole global adapter (same keys and
            shapes), so Flower's central-DP clipping wrapper applies as it is.
        own_global_update: why the strategy alone must decide how its global adapter
            moves (``""``: it need not), so a server optimizer (``server-opt.*``) and
            SCAFFOLD's control variates (``scaffold.enabled``) are refused.
    """

    aggregator: Aggregator[Any]
    client: ClientAlgorithm = field(default_factory=FullAdapter)
    selector: Selector[Any] | None = None
    lossy_codecs: bool = True
    needs_individual_updates: bool = False
    mixed_ranks: bool = False
    dp_compatible: bool = False
    own_global_update: str = ""


BuildFn = Callable[[Any, StrategyEnv], FedStrategy]


@dataclass(frozen=True)
class StrategyEntry:
    """A registration: name, config class, builder and a one-line summary."""

    name: str
    config_cls: type[Any]
    build: BuildFn
    summary: str = ""


_STRATEGIES: dict[str, StrategyEntry] = {}
_NAME = re.compile(r"^[a-z][a-z0-9]*(-[a-z0-9]+)*$")


def register_strategy(
    name: str,
    *,
    config_cls: type[Any],
    build: BuildFn,
    summary: str = "",
    replace: bool = False,
) -> None:
    """Register a strategy under ``name``.

    Args:
        name: lowercase kebab-case key (``"lora-fair"``); also the run-config section
            holding the strategy's options.
        config_cls: a frozen dataclass whose fields all have defaults.
        build: ``build(config, env) -> FedStrategy``.
        summary: one line shown by ``fedpeft strategies``.
        replace: allow replacing an existing registration (for notebooks/tests).

    Raises:
        RegistryError: bad name, duplicate name, or a config class that is not a
            dataclass with defaults.
    """
    if not _NAME.match(name):
        raise RegistryError(
            f"strategy name must be lowercase kebab-case like 'lora-fair', got {name!r}"
        )
    if name in _STRATEGIES and not replace:
        raise RegistryError(
            f"strategy {name!r} is already registered; pass replace=True to override"
        )
    if not dataclasses.is_dataclass(config_cls):
        raise RegistryError(f"config_cls of {name!r} must be a dataclass, got {config_cls!r}")
    missing = [
        f.name
        for f in dataclasses.fields(config_cls)
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise RegistryError(
            f"every field of {config_cls.__name__} needs a default; missing: {missing}"
        )
    _STRATEGIES[name] = StrategyEntry(name, config_cls, build, summary)


def _load_builtins() -> None:
    """Import the ``fedpeft.plugins`` entry points (the built-ins are one of them)."""
    from fedpeft.plugins import load_entry_points

    load_entry_points()


def get_strategy(name: str) -> StrategyEntry:
    """Return the registration of ``name``.

    Raises:
        RegistryError: unknown name; the message lists the available strategies.
    """
    _load_builtins()
    if name not in _STRATEGIES:
        raise RegistryError(
            f"unknown strategy {name!r}; available: " + ", ".join(available_strategies())
        )
    return _STRATEGIES[name]


def available_strategies() -> list[str]:
    """Registered strategy names (built-ins and plug-ins), sorted."""
    _load_builtins()
    return sorted(_STRATEGIES)
