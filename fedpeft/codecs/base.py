"""The ``Codec`` protocol, the ``Payload`` it produces, chains and the codec registry.

A payload is what crosses the wire: named numpy arrays plus scalar metadata. The
Flower layer turns ``arrays`` into an ``ArrayRecord`` and ``meta`` into a
``ConfigRecord`` and counts the serialized bytes of both.

Every codec is a *stage* ``Payload -> Payload``. A tensor dict enters as fp32 arrays
(:func:`to_payload`), passes each stage of a :class:`Chain` in order, and is restored
by decoding the stages in reverse order (:func:`from_payload`). Stages that keep
state between rounds (``lowrank``'s warm start) receive it and return the new one;
the caller stores it (client: ``Context.state``; server: strategy state).

Error feedback is a property of the chain, not of its stages: a lossy chain adds the
error it has not yet delivered to its input, encodes through every stage, decodes its
own payload to get exactly what the receiver will reconstruct, and keeps the
difference for the next round (:class:`Chain`), so the errors of sparsification,
low-rank projection, quantization and casts are all fed back, once.
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

FEEDBACK = "ef/"
"""Prefix of a chain's error-feedback residuals in its state (stage ``i`` uses ``"<i>/"``)."""


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
    """One encoding stage. Register factories with :func:`register_codec`.

    Optional attributes, read with a default when a stage does not define them:

    * ``contractive`` (default ``True``): the stage's error is smaller than its input
      (``E‖C(x) − x‖² ≤ (1 − δ)‖x‖²`` for some ``δ > 0``: top-k, casts, projections
      onto a subspace, and blockwise max-scaled quantizers: ``1 − δ ≤ 0.75`` for
      ``int4`` blocks of 256), so a :class:`Chain` may feed it back. A
      stage whose error can exceed its input (Ferret's random projection) sets it to
      ``False``, which turns error feedback off for every chain that contains it.
    * ``uplink_only`` (default ``False``): the stage codes a client's change and is
      refused on the downlink.
    """

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
    """Stages applied left to right on encode and right to left on decode, with error
    feedback over the whole chain.

    Error feedback (EF) as in Stich, Cordonnier & Jaggi, "Sparsified SGD with Memory",
    NeurIPS 2018 (arXiv:1809.07599) and Karimireddy et al., "Error Feedback Fixes
    SignSGD and other Gradient Compression Schemes", ICML 2019 (arXiv:1901.09847);
    ALGORITHMS.md §12.2. Per fp32 array ``u_t`` of round ``t``, with ``encode`` and
    ``decode`` those of the whole chain::

        v_t = u_t + e_{t−1}          (e_0 = 0; float64)
        c_t = decode(encode(v_t))    (what the receiver reconstructs, fp32)
        e_t = v_t − c_t              (state key "ef/<key>", float64)

    so ``Σ_t c_t + e_T = Σ_t u_t`` to float64 rounding for every lossy chain: the
    errors of every stage (top-k's dropped entries, the quantizer's rounding, the fp32
    rounding of ``v_t``) are delayed, never lost. ``c_t`` is computed by decoding the
    encoded payload locally; decoding is deterministic given the payload and ``ctx``
    (stochastic stages such as ``int8`` draw their randomness at encode time, from
    ``ctx.seed``), so it equals the receiver's result bit for bit. Stages keep no
    residuals of their own, so nothing is counted twice; the wire format and byte
    counts are those of the stages alone.

    EF is on when ``error_feedback`` is set, the chain is lossy and every stage is
    ``contractive`` (see :class:`Codec`). Lossless chains keep no residual. A chain with
    a non-contractive stage (``ferret:K``) keeps none either: Ferret's estimate is
    unbiased but its error is larger than the update (relative ≈ ``√(d/K)``), so a
    carried residual would grow without bound. Residuals that are exactly zero are not
    stored (absent means zero), residuals of keys absent from a payload are carried
    over, and non-finite entries are passed on but not carried (they would poison
    every later round). Integer arrays (``aux.`` seeds, indices) are not fed back.

    Stage ``i`` sees only its own state (keys prefixed ``"<i>/"`` in the chain state),
    so stateful stages compose without knowing each other.

    Attributes:
        stages: the stages, in encoding order.
        error_feedback: feed the chain's error back (when lossy and contractive);
            ``False`` sends each round's encoding of ``u_t`` alone.
    """

    stages: tuple[Codec, ...]
    error_feedback: bool = True

    @property
    def name(self) -> str:
        """The chain's spec, e.g. ``"topk:0.05+int8+zstd"``."""
        return "+".join(s.name for s in self.stages)

    @property
    def lossless(self) -> bool:
        """True if every stage is lossless."""
        return all(s.lossless for s in self.stages)

    @property
    def feeds_back(self) -> bool:
        """True if :meth:`encode` carries the chain's error between rounds."""
        return (
            self.error_feedback
            and not self.lossless
            and all(getattr(s, "contractive", True) for s in self.stages)
        )

    def encode(
        self, payload: Payload, state: CodecState, ctx: CodecContext
    ) -> tuple[Payload, CodecState]:
        """Encode through every stage in order, feeding back the chain's error.

        Raises:
            CodecError: a stored residual's shape differs from its tensor's (reset the
                codec state when a tensor changes shape, e.g. a new rank), or a stage
                refuses the payload.
        """
        if not self.feeds_back:
            return self._encode_stages(payload, state, ctx)
        carried: dict[str, np.ndarray] = {}  # v_t per fed-back key, float64
        arrays = dict(payload.arrays)
        for key, arr in payload.arrays.items():
            if arr.dtype != np.float32:
                continue
            v = arr.astype(np.float64)
            residual = state.get(FEEDBACK + key)
            if residual is not None:
                if residual.shape != arr.shape:
                    raise CodecError(
                        f"error-feedback residual for {key!r} has shape {residual.shape}, "
                        f"but the tensor has shape {arr.shape}; reset the codec state when "
                        "a tensor changes shape"
                    )
                v += residual
            carried[key] = v
            arrays[key] = v.astype(np.float32)
        encoded, new_state = self._encode_stages(Payload(arrays, dict(payload.meta)), state, ctx)
        decoded = self.decode(encoded, ctx).arrays
        for key, v in carried.items():
            c = decoded.get(key)
            if c is None or c.shape != v.shape:
                raise CodecError(
                    f"chain {self.name!r} did not restore array {key!r} {v.shape} when "
                    f"decoding its own payload (got {None if c is None else c.shape})"
                )
            with np.errstate(invalid="ignore"):  # inf − inf: not carried, below
                e = np.asarray(v - c.astype(np.float64))  # 0-d stays an array
            e[~np.isfinite(e)] = 0.0
            if e.any():
                new_state[FEEDBACK + key] = e
        for key, residual in state.items():  # tensors not sent this round keep theirs
            if key.startswith(FEEDBACK) and key[len(FEEDBACK) :] not in payload.arrays:
                new_state[key] = residual
        return encoded, new_state

    def _encode_stages(
        self, payload: Payload, state: CodecState, ctx: CodecContext
    ) -> tuple[Payload, CodecState]:
        new_state: CodecState = {}
        for i, stage in enumerate(self.stages):
            prefix = f"{i}/"
            own = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
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
