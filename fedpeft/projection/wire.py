"""Wire format of Ferret coordinates (uplink) and round updates (downlink).

Uplink, one client (ALGORITHMS.md §10 "Wire")::

    values   float32 (n,)    γ, block after block          4 bytes each
    indices  uint16  (n,)    pool index j of each γ        2 bytes each
    offsets  int32   (L+1,)  CSR block boundaries          the header
    bytes = 6·Σ_l K_l + 4·(L + 1)

Downlink, R rounds (one round normally; more for a client catching up)::

    gamma       float32 (R, L, K)   coordinate tables Γ_t
    rounds      int64   (R,)        t
    pool_seeds  int64   (R,)        P (63-bit)
    server_lrs  float64 (R,)        η_s
    bytes = R·(4·L·K + 24)

Arrays are plain numpy (a ``Payload``'s ``arrays``); lossless only (zstd at most), never a
lossy codec (ALGORITHMS.md §12.1).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

from fedpeft.errors import CodecError
from fedpeft.projection.ferret import Coefficients, RoundUpdate

UPLINK_KEYS = ("values", "indices", "offsets")
DOWNLINK_KEYS = ("gamma", "rounds", "pool_seeds", "server_lrs")


def upload_nbytes(budgets: Sequence[int]) -> int:
    """Bytes of an encoded upload: ``6·Σ K_l + 4·(L + 1)``."""
    return 6 * sum(budgets) + 4 * (len(budgets) + 1)


def downlink_nbytes(num_blocks: int, num_seeds: int, num_rounds: int = 1) -> int:
    """Bytes of ``num_rounds`` encoded round updates: ``R·(4·L·K + 24)``."""
    return num_rounds * (4 * num_blocks * num_seeds + 24)


def encode_coefficients(coeffs: Coefficients) -> dict[str, np.ndarray]:
    """Pack one client's coordinates (fp32 values, uint16 indices, int32 offsets)."""
    return {
        "values": np.ascontiguousarray(coeffs.values, dtype=np.float32),
        "indices": coeffs.indices.astype(np.uint16),
        "offsets": coeffs.offsets.astype(np.int32),
    }


def decode_coefficients(
    arrays: Mapping[str, np.ndarray], *, num_blocks: int, num_seeds: int
) -> Coefficients:
    """Unpack and validate an upload; raises ``CodecError`` naming the broken field."""
    missing = [k for k in UPLINK_KEYS if k not in arrays]
    if missing:
        raise CodecError(f"Ferret upload lacks arrays {missing}; expected {list(UPLINK_KEYS)}")
    values, indices, offsets = (np.asarray(arrays[k]) for k in UPLINK_KEYS)
    for key, arr, dtype in (
        ("values", values, np.float32),
        ("indices", indices, np.uint16),
        ("offsets", offsets, np.int32),
    ):
        if arr.dtype != dtype or arr.ndim != 1:
            raise CodecError(
                f"Ferret upload '{key}' is {arr.dtype} with shape {arr.shape}, "
                f"expected 1-d {np.dtype(dtype)}"
            )
    if offsets.shape[0] != num_blocks + 1:
        raise CodecError(
            f"Ferret upload 'offsets' has {offsets.shape[0]} entries, expected "
            f"num_blocks + 1 = {num_blocks + 1}"
        )
    budgets = np.diff(offsets)
    if offsets[0] != 0 or (budgets < 1).any() or offsets[-1] != values.shape[0]:
        raise CodecError(
            "Ferret upload 'offsets' must start at 0, increase strictly and end at "
            f"len(values) = {values.shape[0]}; got {offsets[:4].tolist()}…{offsets[-1]}"
        )
    if indices.shape[0] != values.shape[0]:
        raise CodecError(
            f"Ferret upload has {indices.shape[0]} indices for {values.shape[0]} values"
        )
    wide = indices.astype(np.int64)
    if wide.size and int(wide.max()) >= num_seeds:
        raise CodecError(
            f"Ferret upload uses pool index {int(wide.max())}, expected < num_seeds={num_seeds}"
        )
    steps = np.diff(wide)
    starts = offsets[1:-1].astype(np.int64) - 1  # positions where a new block begins, minus 1
    inside = np.ones(steps.shape[0], dtype=bool)
    inside[starts] = False
    if (steps[inside] <= 0).any():
        raise CodecError("Ferret upload 'indices' must increase strictly within each block")
    if not np.isfinite(values).all():
        raise CodecError("Ferret upload 'values' contains non-finite coordinates")
    return Coefficients(offsets.astype(np.int64), wide, values.copy(), num_seeds)


def encode_round_updates(updates: Sequence[RoundUpdate]) -> dict[str, np.ndarray]:
    """Pack round updates (one, or the rounds a lagging client missed) for the downlink."""
    if not updates:
        raise CodecError("encode_round_updates got no round updates; expected at least one")
    return {
        "gamma": np.stack([u.gamma.to(torch.float32).numpy() for u in updates]),  # (R, L, K)
        "rounds": np.array([u.server_round for u in updates], dtype=np.int64),
        "pool_seeds": np.array([u.pool_seed for u in updates], dtype=np.int64),
        "server_lrs": np.array([u.server_lr for u in updates], dtype=np.float64),
    }


def decode_round_updates(arrays: Mapping[str, np.ndarray]) -> list[RoundUpdate]:
    """Unpack round updates; raises ``CodecError`` on missing or inconsistent arrays."""
    missing = [k for k in DOWNLINK_KEYS if k not in arrays]
    if missing:
        raise CodecError(f"Ferret downlink lacks arrays {missing}; expected {list(DOWNLINK_KEYS)}")
    gamma = np.asarray(arrays["gamma"])
    rounds, seeds, lrs = (np.asarray(arrays[k]) for k in DOWNLINK_KEYS[1:])
    if gamma.dtype != np.float32 or gamma.ndim != 3:
        raise CodecError(
            f"Ferret downlink 'gamma' is {gamma.dtype} with shape {gamma.shape}, "
            "expected float32 (rounds, num_blocks, num_seeds)"
        )
    if not rounds.shape == seeds.shape == lrs.shape == (gamma.shape[0],):
        raise CodecError(
            f"Ferret downlink has {gamma.shape[0]} tables but rounds/pool_seeds/server_lrs "
            f"of shapes {rounds.shape}, {seeds.shape}, {lrs.shape}"
        )
    return [
        RoundUpdate(int(r), int(s), torch.from_numpy(g.copy()), float(lr))
        for g, r, s, lr in zip(gamma, rounds, seeds, lrs, strict=True)
    ]
