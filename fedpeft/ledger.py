"""The byte ledger: exact serialized bytes per round, direction and client."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Literal

Direction = Literal["uplink", "downlink"]


@dataclass
class ByteLedger:
    """Append-only record of bytes on the wire.

    The Flower layer records, for every message it builds or receives, its serialized
    size (array data with npy headers, keys, config and metric records) and its
    *payload* size (the raw bytes of the arrays alone, what wire-size formulas such
    as Ferret's ``6·Σ K_l + 4·(L+1)`` count); nothing is estimated here.

    Entries are ``(round, direction, node_id, bytes, payload_bytes)``.
    """

    entries: list[tuple[int, str, int, int, int]] = field(default_factory=list)

    def record(
        self, server_round: int, direction: Direction, node_id: int, nbytes: int, payload_nbytes: int = 0
    ) -> None:
        """Add a message of ``nbytes`` (``payload_nbytes`` of array data) sent in
        ``direction`` to/from ``node_id`` in ``server_round``."""
        self.entries.append((server_round, direction, node_id, int(nbytes), int(payload_nbytes)))

    def restore(self, entries: list[list[int | str]]) -> None:
        """Load entries saved by a checkpoint (4-field entries have no payload count)."""
        self.entries = [(*e, 0) if len(e) == 4 else tuple(e) for e in entries]  # type: ignore[misc]

    def round_total(self, server_round: int, direction: Direction, *, payload: bool = False) -> int:
        """Bytes (or payload bytes) of one direction in one round."""
        i = 4 if payload else 3
        return sum(e[i] for e in self.entries if e[0] == server_round and e[1] == direction)

    def per_client(self, server_round: int, direction: Direction) -> dict[int, int]:
        """Bytes per client of one direction in one round."""
        out: dict[int, int] = defaultdict(int)
        for r, d, n, b, _ in self.entries:
            if r == server_round and d == direction:
                out[n] += b
        return dict(out)

    def total(self, direction: Direction, *, payload: bool = False) -> int:
        """Bytes (or payload bytes) of one direction over the whole run."""
        i = 4 if payload else 3
        return sum(e[i] for e in self.entries if e[1] == direction)

    def to_rows(self) -> list[dict[str, int | str]]:
        """The entries as JSON-ready rows."""
        return [
            {"round": r, "direction": d, "node_id": n, "bytes": b, "payload_bytes": p}
            for r, d, n, b, p in self.entries
        ]
