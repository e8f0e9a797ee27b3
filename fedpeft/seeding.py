"""Deterministic seed derivation: every random stream comes from a named tuple.

``derive_seed(run_seed, "sample", server_round)`` always returns the same 63-bit
integer on every platform (BLAKE2b of the parts), so server sampling, client data
order and stochastic codecs never depend on a global RNG (ALGORITHMS.md §0).
"""

from __future__ import annotations

import hashlib


def derive_seed(*parts: int | str) -> int:
    """Return a 63-bit seed that depends only on ``parts`` (order matters)."""
    text = "/".join(str(p) for p in parts).encode()
    digest = hashlib.blake2b(text, digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)
