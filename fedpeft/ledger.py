"""The byte ledger: exact serialized bytes per round, direction and client."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Literal

Direction = Literal["uplink", "downlink"]


@dataclass
class ByteLedger:
    """Append-only record of bytes on the wire.

    The Flower layer records the serialized size of every message it builds or
    receives (array data with npy headers, keys and config records); nothing is
    estimated here.
    """

    entries: list[tuple[int, str, int, int]] = field(default_factory=list)

    def record(self, server_round: int, direction: Direction, node_id: int, nbytes: int) -> None:
        """Add ``nbytes`` sent in ``direction`` to/from ``node_id`` in ``server_round``."""
        self.entries.append((server_round, direction, node_id, int(nbytes)))

    def round_total(self, server_round: int, direction: Direction) -> int:
        """Bytes of one direction in one round."""
        return sum(b for r, d, _, b in self.entries if r == server_round and d == direction)

    def per_client(self, server_round: int, direction: Direction) -> dict[int, int]:
        """Bytes per client of one direction in one round."""
        out: dict[int, int] = defaultdict(int)
        for r, d, n, b in self.entries:
            if r == server_round and d == direction:
                out[n] += b
        return dict(out)

    def total(self, direction: Direction) -> int:
        """Bytes of one direction over the whole run."""
        return sum(b for _, d, _, b in self.entries if d == direction)

    def to_rows(self) -> list[dict[str, int | str]]:
        """The entries as JSON-ready rows."""
        return [
            {"round": r, "direction": d, "node_id": n, "bytes": b} for r, d, n, b in self.entries
        ]
