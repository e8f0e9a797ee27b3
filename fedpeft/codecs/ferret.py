"""``ferret``: an uplink stage that sends an update as Ferret coordinates.

Shu et al., "Ferret: Federated Full-Parameter Tuning at Scale for Large Language
Models", ICML 2025 (arXiv 2409.06277); ALGORITHMS.md §10. The float32 data arrays of
the payload (on the uplink of a lossy chain these are the client's *deltas* against
what it received, see :mod:`fedpeft.codecs.tensors`) are flattened in payload order,
split into blocks (:func:`fedpeft.projection.partition_blocks`) and projected on
seeded random bases (:func:`fedpeft.projection.encode_update`, unbiased
normalisation, adaptive per-block budgets ``K_l <= K``); the server rebuilds the
unbiased estimate ``Δ̃`` with the same seeds. Bytes::

    values   float32 (Σ K_l,)   ferret::values
    indices  uint16  (Σ K_l,)   ferret::indices
    offsets  int32   (L + 1,)   ferret::offsets
    6·Σ_l K_l + 4·(L + 1) bytes, plus the key list in the meta

This is the projection as a codec, so any LoRA strategy can chain it
(``codec.uplink = "ferret:200"``, or ``"ferret:200+zstd"``). Unlike the ``ferret``
*strategy* the server decodes every client separately (``O(N·K·d)`` instead of
``O(K·d)``) and the downlink is unchanged. The estimate is unbiased but noisy
(relative squared error ≈ ``d_l/K_l`` per block).

No error feedback: the stage is not ``contractive`` (its error is larger than the
update, relative ≈ ``√(d_l/K_l)``), so a chain containing it keeps no residual and
sends each round's unbiased estimate alone, as the Ferret paper does; a carried
residual would grow without bound. Other lossy stages in the same chain are then not
fed back either.

Spec: ``ferret:<K>`` (``K`` in ``[1, 65536]``, default 200). Uplink only.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import torch

from fedpeft.codecs._layout import SEP, int_param, is_data
from fedpeft.codecs.base import CodecContext, CodecState, Payload, register_codec
from fedpeft.errors import CodecError
from fedpeft.projection import (
    FerretConfig,
    decode_coefficients,
    encode_coefficients,
    encode_update,
    partition_blocks,
    reconstruct_update,
)
from fedpeft.seeding import derive_seed

TAG = "ferret" + SEP
KEYS = TAG + "keys"


@dataclass(frozen=True)
class FerretProjection:
    """Project the payload's float32 arrays on ``K`` shared-seed bases per block.

    Attributes:
        num_seeds: ``K``, the seed pool and the largest per-block budget.
        block_ratio: block boundary rule (``0.9 × median`` tensor size).
    """

    num_seeds: int = 200
    block_ratio: float = 0.9
    uplink_only: bool = True

    @property
    def name(self) -> str:
        """``ferret:<K>``."""
        return f"ferret:{self.num_seeds}"

    @property
    def lossless(self) -> bool:
        """Lossy: an unbiased random estimate."""
        return False

    @property
    def contractive(self) -> bool:
        """No: the estimate's error exceeds the update, so it is never fed back."""
        return False

    def _seeds(self, ctx: CodecContext) -> tuple[int, int]:
        return derive_seed(ctx.seed, "ferret-codec-pool"), derive_seed(
            ctx.seed, "ferret-codec-subset"
        )

    def _config(self) -> FerretConfig:
        return FerretConfig(num_seeds=self.num_seeds)

    def encode(
        self, payload: Payload, state: CodecState, ctx: CodecContext
    ) -> tuple[Payload, CodecState]:
        """Replace every float32 data array by the coordinates of all of them."""
        if ctx.direction != "uplink":
            raise CodecError(
                f"codec {self.name!r} is uplink-only (it codes a client's change); "
                f"got direction {ctx.direction!r}"
            )
        data = {k: a for k, a in payload.arrays.items() if is_data(k, a) and a.size}
        if not data:
            return payload, state
        position = {k: i for i, k in enumerate(payload.arrays)}
        rest = {k: a for k, a in payload.arrays.items() if k not in data}
        layout = partition_blocks([(k, int(a.size)) for k, a in data.items()], self.block_ratio)
        delta = {k: torch.from_numpy(np.ascontiguousarray(a)) for k, a in data.items()}
        zeros = {k: torch.zeros_like(v) for k, v in delta.items()}
        pool, subset = self._seeds(ctx)
        coeffs = encode_update(
            delta, zeros, layout, pool_seed=pool, client_seed=subset, config=self._config()
        )
        arrays = dict(rest)
        arrays.update({TAG + k: v for k, v in encode_coefficients(coeffs).items()})
        meta = dict(payload.meta)
        meta[KEYS] = json.dumps([[k, list(a.shape), position[k]] for k, a in data.items()])
        return Payload(arrays=arrays, meta=meta), state

    def decode(self, payload: Payload, ctx: CodecContext) -> Payload:
        """Rebuild the unbiased estimate of every projected array (float32)."""
        if KEYS not in payload.meta:
            return payload
        try:
            entries = [
                (str(k), tuple(int(d) for d in s), int(i))
                for k, s, i in json.loads(str(payload.meta[KEYS]))
            ]
        except (ValueError, TypeError) as err:
            raise CodecError(
                f"ferret meta {KEYS!r} is not a JSON list of [key, shape, position]: {err}"
            ) from err
        like = {k: torch.zeros(s) for k, s, _ in entries}
        layout = partition_blocks([(k, v.numel()) for k, v in like.items()], self.block_ratio)
        packed = {k[len(TAG) :]: a for k, a in payload.arrays.items() if k.startswith(TAG)}
        coeffs = decode_coefficients(packed, num_blocks=layout.num_blocks, num_seeds=self.num_seeds)
        pool, _ = self._seeds(ctx)
        estimate = reconstruct_update(
            coeffs.table(), layout, like, pool_seed=pool, config=self._config()
        )
        rest = [(k, a) for k, a in payload.arrays.items() if not k.startswith(TAG)]
        for key, _, at in sorted(entries, key=lambda e: e[2]):  # back to the payload order
            rest.insert(at, (key, estimate[key].to(torch.float32).numpy()))
        arrays = dict(rest)
        meta = {k: v for k, v in payload.meta.items() if k != KEYS}
        return Payload(arrays=arrays, meta=meta)


def _ferret(param: str | None) -> FerretProjection:
    if param is None:
        return FerretProjection()
    return FerretProjection(
        int_param("ferret", param, low=1, high=1 << 16, what="the seed pool size K")
    )


register_codec("ferret", _ferret)
