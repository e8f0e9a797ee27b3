"""The strategy registry: validation and openness to outside packages."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from fedpeft import FedStrategy, RegistryError, WeightedMean, available_strategies, get_strategy, register_strategy


@dataclass(frozen=True)
class _Cfg:
    x: int = 1


@dataclass(frozen=True)
class _NoDefault:
    x: int


def _build(cfg, env):
    return FedStrategy(aggregator=WeightedMean())


def test_builtin_fedit_is_registered():
    assert "fedit" in available_strategies()
    assert get_strategy("fedit").summary


def test_unknown_name_lists_available():
    with pytest.raises(RegistryError, match="unknown strategy 'nope'; available: .*fedit"):
        get_strategy("nope")


@pytest.mark.parametrize("name", ["Bad", "bad_name", "-x", ""])
def test_bad_names_are_rejected(name):
    with pytest.raises(RegistryError, match="kebab-case"):
        register_strategy(name, config_cls=_Cfg, build=_build)


def test_duplicates_and_config_without_defaults_are_rejected():
    register_strategy("test-dup", config_cls=_Cfg, build=_build, replace=True)
    with pytest.raises(RegistryError, match="already registered"):
        register_strategy("test-dup", config_cls=_Cfg, build=_build)
    with pytest.raises(RegistryError, match="needs a default"):
        register_strategy("test-nodefault", config_cls=_NoDefault, build=_build)
