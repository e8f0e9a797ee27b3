"""Seeded fault injection: which sampled client drops, crashes or is slow, and which
partitions are Byzantine attackers (what they do: :mod:`fedpeft.attacks`)."""

from __future__ import annotations

import math
import random
from typing import Literal

import numpy as np

from fedpeft.attacks import Attack, parse_attack
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


def attacker_ids(cfg: FaultConfig, seed: int, num_partitions: int) -> list[int]:
    """The partition ids that attack (``faults.attack``) throughout the run, sorted.

    The first ``round(byzantine_rate · num_partitions)`` (halves round up) of a
    permutation of the partition ids seeded by ``(seed, "byzantine")``: the same set in
    every round, on the server and on every client, and a prefix of it for a lower rate.
    Empty when ``faults.attack`` is ``none``.
    """
    if parse_attack(cfg.attack) is None or num_partitions <= 0:
        return []
    count = min(num_partitions, math.floor(cfg.byzantine_rate * num_partitions + 0.5 + 1e-9))
    perm = np.random.Generator(np.random.PCG64(derive_seed(seed, "byzantine"))).permutation(num_partitions)
    return sorted(int(i) for i in perm[:count])


def client_attack(cfg: FaultConfig, seed: int, partition_id: int, num_partitions: int) -> Attack | None:
    """The attack partition ``partition_id`` carries out (``None``: it is honest)."""
    attack = parse_attack(cfg.attack)
    if attack is None or partition_id not in attacker_ids(cfg, seed, num_partitions):
        return None
    return attack
