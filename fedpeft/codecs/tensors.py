"""Encoding adapter tensors for the wire, in both directions (no Flower import).

Lossy uplink chains code *deltas* against what the client started from
(ALGORITHMS.md §12.1: smaller dynamic range, errors do not accumulate in the
state); the server adds its own copy of that reference back. Lossless chains send
the tensors themselves, so ``identity`` is bit-exact.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from fedpeft.codecs.base import Chain, CodecContext, CodecState, Payload, from_payload, to_payload
from fedpeft.types import TensorDict


def _reference_for(key: str, value: torch.Tensor, reference: Mapping[str, torch.Tensor]) -> torch.Tensor | None:
    ref = reference.get(key)
    if ref is not None and tuple(ref.shape) == tuple(value.shape):
        return ref
    return None


def encode_tensors(
    tensors: Mapping[str, torch.Tensor],
    codec: Chain,
    state: CodecState,
    ctx: CodecContext,
) -> tuple[Payload, CodecState]:
    """Encode ``tensors`` (as deltas against ``ctx.reference`` if the chain is lossy)."""
    if not codec.lossless and ctx.reference is not None:
        deltas = {}
        for key, value in tensors.items():
            ref = _reference_for(key, value, ctx.reference)
            deltas[key] = value.float() - ref.float() if ref is not None else value
        tensors = deltas
    return codec.encode(to_payload(tensors), state, ctx)


def decode_tensors(payload: Payload, codec: Chain, ctx: CodecContext) -> TensorDict:
    """Inverse of :func:`encode_tensors`."""
    tensors = from_payload(codec.decode(payload, ctx))
    if not codec.lossless and ctx.reference is not None:
        for key, value in tensors.items():
            ref = _reference_for(key, value, ctx.reference)
            if ref is not None:
                tensors[key] = ref.float() + value
    return tensors
