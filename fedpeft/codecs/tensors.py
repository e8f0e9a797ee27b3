"""Encoding adapter tensors for the wire, in both directions (no Flower import).

Lossy uplink chains code *deltas* against what the client started from
(ALGORITHMS.md §12.1: smaller dynamic range, errors do not accumulate in the
state); the server adds its own copy of that reference back. Lossless chains send
the tensors themselves, so ``identity`` is bit-exact.

Lossy *downlink* chains code deltas too (``codec.downlink-delta``, on by default): the
reference is what that client decoded the last time it completed a round, which both
ends keep (the server in its per-partition downlink state, the client in its codec
state), and the payload names the round of that reference (``meta["ref-round"]``; 0 =
none, the tensors themselves). Coding ``g_t − ĝ`` against what the client holds is its
own error feedback: what one round did not deliver stays in the next round's delta, so
the chain's error feedback is off on this path (it would count the error twice). A
client that does not hold the named round refuses the message with the reason, and the
server sends that client the tensors themselves at its next message.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import numpy as np
import torch

from fedpeft.codecs.base import Chain, CodecContext, CodecState, Payload, from_payload, to_payload
from fedpeft.errors import CodecError
from fedpeft.types import TensorDict

REF_ROUND = "ref-round"
"""Payload meta key: the round whose decoded downlink the delta is coded against (0: none)."""

HELD = "held/"
"""Prefix, in a downlink reference state, of the tensors the client holds."""

_HELD_ROUND = "held-round"


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


def held_reference(state: Mapping[str, np.ndarray]) -> tuple[int, TensorDict | None]:
    """``(round, tensors)`` of a downlink reference state; ``(0, None)`` if it holds none."""
    held_round = state.get(_HELD_ROUND)
    if held_round is None or np.size(held_round) != 1:
        return 0, None
    held_round = np.asarray(held_round).reshape(-1)[0]  # 0-d may come back as (1,)
    tensors = {k[len(HELD) :]: torch.from_numpy(np.array(v)) for k, v in state.items() if k.startswith(HELD)}
    return int(held_round), tensors


def split_reference(state: Mapping[str, np.ndarray]) -> tuple[CodecState, CodecState]:
    """A client codec state as ``(downlink reference entries, the rest)``."""
    held = {k: v for k, v in state.items() if k.startswith(HELD) or k == _HELD_ROUND}
    return held, {k: v for k, v in state.items() if k not in held}


def reference_state(server_round: int, tensors: Mapping[str, torch.Tensor]) -> CodecState:
    """The downlink reference state for ``tensors`` decoded in ``server_round``."""
    state: CodecState = {_HELD_ROUND: np.array(server_round, dtype=np.int64)}
    for key, value in tensors.items():
        state[HELD + key] = value.detach().cpu().numpy().copy()
    return state


def encode_downlink(
    tensors: Mapping[str, torch.Tensor], codec: Chain, held: Mapping[str, np.ndarray], ctx: CodecContext
) -> tuple[Payload, TensorDict]:
    """Encode a lossy downlink as deltas against ``held`` (a :func:`reference_state`, or
    ``{}``) without chain error feedback; returns the payload (``meta["ref-round"]`` set)
    and exactly what the client will decode."""
    held_round, reference = held_reference(held)
    ctx = dataclasses.replace(ctx, reference=reference)
    chain = dataclasses.replace(codec, error_feedback=False)
    payload, _ = encode_tensors(tensors, chain, {}, ctx)
    decoded = decode_tensors(payload, chain, ctx)
    return Payload(payload.arrays, {**payload.meta, REF_ROUND: held_round}), decoded


def decode_downlink(payload: Payload, codec: Chain, held: Mapping[str, np.ndarray], ctx: CodecContext) -> TensorDict:
    """Decode a payload of :func:`encode_downlink` with the client's reference state.

    Raises:
        CodecError: the payload is coded against a round this client does not hold.
    """
    meta = dict(payload.meta)
    want = int(meta.pop(REF_ROUND, 0))
    reference = None
    if want:
        held_round, reference = held_reference(held)
        if held_round != want:
            holds = f"round {held_round}'s" if held_round else "none"
            raise CodecError(
                f"the downlink is coded against round {want}'s payload and this client holds "
                f"{holds}; the server sends the full tensors at the next message"
            )
    return decode_tensors(Payload(payload.arrays, meta), codec, dataclasses.replace(ctx, reference=reference))
