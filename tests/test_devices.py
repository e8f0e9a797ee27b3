"""Device profiles, named mixes and simulated round time."""

from __future__ import annotations

import pytest

from fedpeft.devices import (
    MIXES,
    TIERS,
    DeviceProfile,
    parse_device_profile,
    profile_for,
    profile_to_config,
    simulated_round_seconds,
    tier_of,
)
from fedpeft.errors import ConfigError


def test_mixes_are_deterministic_and_documented() -> None:
    assert [tier_of("mixed-3-tier", i) for i in range(6)] == [
        "fast",
        "medium",
        "slow",
    ] * 2
    assert {profile_for("uniform", i) for i in range(20)} == {TIERS["fast"]}
    tail = [tier_of("long-tail", i) for i in range(100)]
    assert tail.count("fast") == 60 and tail.count("straggler") == 10
    assert "straggler" in tail[:5]
    for mix in MIXES:
        assert [profile_for(mix, i) for i in range(30)] == [
            profile_for(mix, i) for i in range(30)
        ]
    assert [TIERS[t].compute_speed for t in ("fast", "medium", "slow")] == [
        1.0,
        0.5,
        0.2,
    ]


def test_unknown_mix_lists_available() -> None:
    with pytest.raises(
        ConfigError, match="unknown device mix 'tiers'; available: long-tail"
    ):
        profile_for("tiers", 0)


def test_simulated_time_formula() -> None:
    profile = DeviceProfile(
        compute_speed=0.5, uplink_mbps=8.0, downlink_mbps=16.0, memory_gb=4.0
    )
    seconds = simulated_round_seconds(
        3.0, profile, up_bytes=2_000_000, down_bytes=4_000_000
    )
    assert seconds == pytest.approx(3.0 / 0.5 + 8 * 2e6 / 8e6 + 8 * 4e6 / 16e6)
    assert simulated_round_seconds(0.0, profile, 0, 0) == 0.0
    with pytest.raises(ValueError, match="byte counts"):
        simulated_round_seconds(1.0, profile, -1, 0)


def test_parse_profile_from_node_config() -> None:
    assert parse_device_profile({"partition-id": 3}) == TIERS["fast"]
    parsed = parse_device_profile(
        {"device.tier": "slow", "device.compute-speed": "0.25", "device.memory-gb": 2}
    )
    assert parsed == DeviceProfile(
        0.25, TIERS["slow"].uplink_mbps, TIERS["slow"].downlink_mbps, 2.0
    )
    profile = TIERS["medium"]
    assert parse_device_profile(profile_to_config(profile)) == profile


def test_parse_reports_every_bad_value() -> None:
    with pytest.raises(ConfigError) as info:
        parse_device_profile(
            {
                "device.compute-speed": -1,
                "device.uplink-mbps": "fast",
                "device.speed": 1.0,
                "device.tier": "gpu",
                "device.memory-gb": True,
            }
        )
    problems = info.value.problems
    assert len(problems) == 5
    assert "device.compute-speed must be a finite number > 0, got -1" in problems
    assert any("unknown node-config key 'device.speed'" in p for p in problems)
    with pytest.raises(
        ConfigError, match="device.downlink-mbps must be a finite number > 0"
    ):
        DeviceProfile(downlink_mbps=float("inf"))
