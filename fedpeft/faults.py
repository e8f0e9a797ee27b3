"""Seeded fault injection: which sampled client drops, crashes or is slow."""

from __future__ import annotations

import random
from typing import Literal

from fedpeft.config import FaultConfig
from fedpeft.seeding import derive_seed

Fault = Literal["drop", "crash", "slow"]


def draw_fault(cfg: FaultConfig, seed: int, server_round: int, partition_id: int, attempt: int = 0) -> Fault | None:
    """The fault (if any) of one client in one attempt of one round.

    One uniform draw ``u`` from ``(seed, "fault", round, partition, attempt)``:
    ``u < drop_rate`` drops, the next ``crash_rate`` crashes, the next
    ``slow_rate`` is slow. Server and client compute the same answer.
    """
    u = random.Random(derive_seed(seed, "fault", server_round, partition_id, attempt)).random()
    if u < cfg.drop_rate:
        return "drop"
    if u < cfg.drop_rate + cfg.crash_rate:
        return "crash"
    if u < cfg.drop_rate + cfg.crash_rate + cfg.slow_rate:
        return "slow"
    return None
