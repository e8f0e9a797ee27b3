"""The ``Codec`` protocol, the ``Payload`` it produces, chains and the codec registry.

A payload is what crosses the wire: named numpy arrays plus scalar metadata. The
Flower layer turns ``arrays`` into an ``ArrayRecord`` and ``meta`` into a
``ConfigRecord`` and counts the serialized bytes of both.

Every codec is a *stage* ``Payload -> Payload``. A tensor dict enters as fp32 arrays
(:func:`to_payload`), passes each stage of a :class:`Chain` in order, and is restored
by decoding the stages in reverse order (:func:`from_payload`). Stages that keep
state between rounds (error-feedback residuals) receive it and return the new one;
the caller stores it (client: ``Context.state``; server: strategy state).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch

from fedpeft.errors import CodecError, ConfigError
from fedpeft.types import AUX_PREFIX, Scalar, TensorDict

CodecState = dict[str, np.ndarray]
"""Named arrays a codec keeps between rounds (e.g. error-feedback residuals)."""


@dataclass(frozen=True)
class Payload:
    """Encoded tensors: named arrays plus scalar metadata.

    Attributes:
        arrays: numpy arrays of any dtype a Flower ``Array`` accepts (raw bytes travel
            as ``uint8``).
        meta: scalars needed to decode (shapes, dtypes, scales that are not arrays).
    """

    arrays: dict[str, np.ndarray]
    meta: dict[str, Scalar] = field(default_factory=dict)

    def nbytes(self) -> int:
        """Bytes of array data alone (no headers): a quick, transport-free estimate."""
        return int(sum(a.nbytes for a in self.arrays.values()))


@dataclass(frozen=True)
class CodecContext:
    """What both ends of a link know when a payload is encoded or decoded.

    Attributes:
        seed: seed for stochastic stages; identical at encoder and decoder.
        direction: ``"uplink"`` (client to server) or ``"downlink"``.
        reference: tensors the receiver already holds (e.g. the global adapter the
            client started from), for stages that code deltas; ``None`` if none.
    """

    seed: int = 0
    direction: str = "uplink"
    reference: Mapping[str, torch.Tensor] | None = None


class Codec(Protocol):
    """One encoding stage. Register factories with :func:`register_codec`."""

    @property
    def name(self) -> str:
        """The stage's spec, e.g. ``"topk:0.05"``."""
        ...

    @property
    def lossless(self) -> bool:
        """True if ``decode(encode(x)) == x`` bit for bit."""
        ...

    def encode(
        self, payload: Payload, state: CodecState, ctx: CodecContext
    ) -> tuple[Payload, CodecState]:
        """Encode ``payload``; return the encoded payload and the new state."""
        ...

    def decode(self, payload: Payload, ctx: CodecContext) -> Payload:
        """Invert :meth:`encode` (up to the stage's documented error)."""
        ...


def to_payload(tensors: Mapping[str, torch.Tensor]) -> Payload:
    """Tensors as numpy arrays (the identity encoding): fp32, except integer
    auxiliary tensors (keys starting with ``"aux."``: pool indices, seeds, counters)
    which keep their dtype so they travel exactly and at their own width."""
    arrays = {}
    for key, t in tensors.items():
        t = t.detach().to("cpu")
        if not (key.startswith(AUX_PREFIX) and _integer(t.dtype)):
            t = t.to(torch.float32)
        arrays[key] = t.contiguous().numpy()
    return Payload(arrays=arrays)


def _integer(dtype: torch.dtype) -> bool:
    return not dtype.is_floating_point and not dtype.is_complex and dtype != torch.bool


def from_payload(payload: Payload) -> TensorDict:
    """The inverse of :func:`to_payload`; fails if a stage left extra keys."""
    out: TensorDict = {}
    for key, arr in payload.arrays.items():
        aux_int = key.startswith(AUX_PREFIX) and arr.dtype.kind in "iu"
        if arr.dtype != np.float32 and not aux_int:
            raise CodecError(
                f"decoded array {key!r} has dtype {arr.dtype}, expected float32; "
                "the codec chain did not fully decode this payload"
            )
        out[key] = torch.from_numpy(np.array(arr, copy=True))
    return out


@dataclass(frozen=True)
class Chain:
    """Stages applied left to right on encode and right to left on decode.

    Stage ``i`` sees only its own state (keys prefixed ``"<i>/"`` in the chain state),
    so stateful stages compose without knowing each other.
    """

    stages: tuple[Codec, ...]

    @property
    def name(self) -> str:
        """The chain's spec, e.g. ``"topk:0.05+int8+zstd"``."""
        return "+".join(s.name for s in self.stages)

    @property
    def lossless(self) -> bool:
        """True if every stage is lossless."""
        return all(s.lossless for s in self.stages)

    def encode(
        self, payload: Payload, state: CodecState, ctx: CodecContext
    ) -> tuple[Payload, CodecState]:
        """Encode through every stage in order."""
        new_state: CodecState = {}
        for i, stage in enumerate(self.stages):
            prefix = f"{i}/"
            own = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
            payload, own = stage.encode(payload, own, ctx)
            new_state.update({prefix + k: v for k, v in own.items()})
        return payload, new_state

    def decode(self, payload: Payload, ctx: CodecContext) -> Payload:
        """Decode through every stage in reverse order."""
        for stage in reversed(self.stages):
            payload = stage.decode(payload, ctx)
        return payload


CodecFactory = Callable[[str | None], Codec]
"""Builds a stage from its parameter (the text after ``:``, or ``None``)."""

_CODECS: dict[str, CodecFactory] = {}


def register_codec(name: str, factory: CodecFactory, *, replace: bool = False) -> None:
    """Make a codec stage available under ``name`` in codec specs.

    Args:
        name: lowercase kebab-case stage name (no ``+`` or ``:``).
        factory: ``factory(param)`` returns the stage; it raises ``ConfigError`` on a
            bad parameter.
        replace: allow replacing an existing registration.
    """
    if not name or any(c in name for c in "+: ") or name != name.lower():
        raise ConfigError(f"codec name must be lowercase without '+', ':' or spaces, got {name!r}")
    if name in _CODECS and not replace:
        raise ConfigError(f"codec {name!r} is already registered")
    _CODECS[name] = factory


def available_codecs() -> list[str]:
    """Registered stage names, sorted."""
    return sorted(_CODECS)


def build_codec(spec: str) -> Chain:
    """Parse a spec such as ``"topk:0.05+int8+zstd"`` into a :class:`Chain`.

    Raises:
        ConfigError: an unknown stage or a bad parameter; the message lists the
            registered stages.
    """
    stages: list[Codec] = []
    parts = [p.strip() for p in spec.split("+")]
    if not spec.strip() or any(not p for p in parts):
        raise ConfigError(f"codec spec must be stages joined by '+', got {spec!r}")
    for part in parts:
        name, _, param = part.partition(":")
        if name not in _CODECS:
            raise ConfigError(
                f"unknown codec stage {name!r} in {spec!r}; available: "
                + ", ".join(available_codecs())
            )
        stages.append(_CODECS[name](param if param else None))
    return Chain(tuple(stages))
