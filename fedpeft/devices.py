"""Simulated device heterogeneity: compute speed, bandwidth and memory per node.

A :class:`DeviceProfile` describes one device relative to the machine running the
simulation (``compute_speed = 1.0`` means "as fast as this machine"). A node's
simulated round time is::

    T = measured_compute_s / compute_speed
        + 8 · up_bytes / (uplink_mbps · 10⁶) + 8 · down_bytes / (downlink_mbps · 10⁶)

Named mixes assign profiles to partition ids deterministically (no RNG), so a run is
reproducible in simulation and deployment. The tiers are loosely modelled on the
FedSpine testbed (Jetson AGX / NX / TX2; arXiv 2501.02438) — the numbers are
``[PROPOSAL]`` defaults, not measurements:

=========  =====  ==========  ============  ======
tier       speed  uplink Mbps downlink Mbps memory
=========  =====  ==========  ============  ======
fast       1.0    20          100           16 GB
medium     0.5    10          50            8 GB
slow       0.2    2           10            4 GB
straggler  0.05   0.5         2             2 GB
=========  =====  ==========  ============  ======

Mixes (``partition_id → tier``):

* ``uniform``: every node is ``fast``;
* ``mixed-3-tier``: ``fast, medium, slow`` by ``partition_id % 3``;
* ``long-tail``: a cycle of 10 — ``fast, fast, medium, fast, straggler, fast, medium,
  fast, slow, fast`` (60 % fast, 20 % medium, 10 % slow, 10 % straggler), ordered so
  that small federations already see the tail.

A node may override its profile in its node config (flat scalars, see
:func:`parse_device_profile`): ``device.tier``, ``device.compute-speed``,
``device.uplink-mbps``, ``device.downlink-mbps``, ``device.memory-gb``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass

from fedpeft.errors import ConfigError
from fedpeft.types import Scalar

_KEY_OF = {
    "compute_speed": "compute-speed",
    "uplink_mbps": "uplink-mbps",
    "downlink_mbps": "downlink-mbps",
    "memory_gb": "memory-gb",
}


def _positive(value: object) -> bool:
    return (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value > 0
    )


@dataclass(frozen=True)
class DeviceProfile:
    """Capabilities of one simulated device.

    Attributes:
        compute_speed: relative speed; 1.0 = the machine running the simulation,
            0.5 = takes twice as long.
        uplink_mbps: upload bandwidth in megabits (10⁶ bit) per second.
        downlink_mbps: download bandwidth in megabits per second.
        memory_gb: memory available for training, in GB (reported, not enforced).
    """

    compute_speed: float = 1.0
    uplink_mbps: float = 20.0
    downlink_mbps: float = 100.0
    memory_gb: float = 16.0

    def __post_init__(self) -> None:
        """Check every field is a finite number > 0."""
        problems = [
            f"device.{_KEY_OF[f.name]} must be a finite number > 0, "
            f"got {getattr(self, f.name)!r}"
            for f in dataclasses.fields(self)
            if not _positive(getattr(self, f.name))
        ]
        if problems:
            raise ConfigError(problems)


PREFIX = "device."
"""Node-config keys of a device profile start with this prefix."""

TIERS: Mapping[str, DeviceProfile] = {
    "fast": DeviceProfile(1.0, 20.0, 100.0, 16.0),
    "medium": DeviceProfile(0.5, 10.0, 50.0, 8.0),
    "slow": DeviceProfile(0.2, 2.0, 10.0, 4.0),
    "straggler": DeviceProfile(0.05, 0.5, 2.0, 2.0),
}
"""The named device tiers (table in the module docstring)."""

MIXES: Mapping[str, tuple[str, ...]] = {
    "uniform": ("fast",),
    "mixed-3-tier": ("fast", "medium", "slow"),
    "long-tail": (
        "fast",
        "fast",
        "medium",
        "fast",
        "straggler",
        "fast",
        "medium",
        "fast",
        "slow",
        "fast",
    ),
}
"""Named mixes: partition ``i`` gets tier ``cycle[i % len(cycle)]``."""


def tier_of(mix: str, partition_id: int) -> str:
    """The tier name the mix ``mix`` gives to ``partition_id``.

    Raises:
        ConfigError: unknown mix or negative partition id.
    """
    if mix not in MIXES:
        raise ConfigError(
            f"unknown device mix {mix!r}; available: {', '.join(sorted(MIXES))}"
        )
    if partition_id < 0:
        raise ConfigError(f"partition-id must be >= 0, got {partition_id}")
    cycle = MIXES[mix]
    return cycle[partition_id % len(cycle)]


def profile_for(mix: str, partition_id: int) -> DeviceProfile:
    """The profile the mix ``mix`` gives to ``partition_id`` (deterministic)."""
    return TIERS[tier_of(mix, partition_id)]


def profile_to_config(profile: DeviceProfile) -> dict[str, float]:
    """Flat ``device.*`` scalars (for node properties); inverse of the parser."""
    return {
        PREFIX + _KEY_OF[f.name]: float(getattr(profile, f.name))
        for f in dataclasses.fields(profile)
    }


def parse_device_profile(
    config: Mapping[str, Scalar], default: DeviceProfile | None = None
) -> DeviceProfile:
    """Read a profile from a node-config-like flat mapping.

    Only keys starting with ``device.`` are read; others are ignored. ``device.tier``
    (a name of :data:`TIERS`) picks the starting profile (else ``default``, else
    the ``fast`` tier); ``device.compute-speed``, ``device.uplink-mbps``,
    ``device.downlink-mbps`` and ``device.memory-gb`` override single fields.
    Numbers given as strings (``"0.5"``) are accepted.

    Raises:
        ConfigError: every unknown ``device.*`` key, unknown tier, or value that is
            not a finite number > 0, all in one error.
    """
    problems: list[str] = []
    base = default or TIERS["fast"]
    fields = {key: name for name, key in _KEY_OF.items()}
    overrides: dict[str, float] = {}
    for key, value in config.items():
        if not key.startswith(PREFIX):
            continue
        short = key[len(PREFIX) :]
        if short == "tier":
            if value not in TIERS:
                problems.append(
                    f"{key} must be one of {', '.join(TIERS)}, got {value!r}"
                )
            else:
                base = TIERS[str(value)]
        elif short in fields:
            number = _number(value)
            if number is None:
                problems.append(f"{key} must be a finite number > 0, got {value!r}")
            else:
                overrides[fields[short]] = number
        else:
            valid = ["device.tier", *(PREFIX + k for k in fields)]
            problems.append(
                f"unknown node-config key {key!r}; valid keys: {', '.join(valid)}"
            )
    if problems:
        raise ConfigError(problems)
    return dataclasses.replace(base, **overrides)


def _number(value: Scalar) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            return None
    number = float(value)
    return number if _positive(number) else None


def simulated_round_seconds(
    measured_compute_s: float, profile: DeviceProfile, up_bytes: int, down_bytes: int
) -> float:
    """Simulated wall-clock of one round on ``profile``.

    ``measured_compute_s / compute_speed + 8·up_bytes / (uplink_mbps·10⁶)
    + 8·down_bytes / (downlink_mbps·10⁶)``.

    Raises:
        ValueError: a negative or non-finite time or byte count.
    """
    if not (math.isfinite(measured_compute_s) and measured_compute_s >= 0.0):
        raise ValueError(
            f"measured_compute_s must be finite and >= 0, got {measured_compute_s}"
        )
    if up_bytes < 0 or down_bytes < 0:
        raise ValueError(
            f"byte counts must be >= 0, got up={up_bytes} down={down_bytes}"
        )
    compute = measured_compute_s / profile.compute_speed
    upload = 8.0 * up_bytes / (profile.uplink_mbps * 1e6)
    download = 8.0 * down_bytes / (profile.downlink_mbps * 1e6)
    return compute + upload + download
