"""A bytes target per round: tune a chain's ``topk`` stage so the payload fits.

``budget.bytes-per-round`` (uplink bytes per client per round) replaces the fixed
fraction of the chain's ``topk`` stage with the largest fraction ``f`` whose encoded
payload, by :func:`~fedpeft.codecs.analysis.encoded_nbytes` (keys, npy headers, data,
meta: the codec's share of the message), is at most the target. The size of a top-k
payload grows with ``f`` (more values and indices), and ``zstd``'s output nearly so;
``f`` is found by bisection on ``log f`` over ``[f_min, 1]`` with ``f_min`` keeping one
entry per tensor, in :data:`STEPS` encodings. The search encodes with the state of
the round (error-feedback residuals) and keeps the state of the chosen encoding only,
so the residuals are those of what is sent. The decoder needs nothing: ``topk``
payloads carry their own sizes.

When even ``f_min`` does not fit (the target is below the fixed cost of headers and
the other stages' scales), ``f_min`` is sent and the achieved bytes say so; the round
is not refused. The fraction and the achieved bytes are reported per client
(``uplink-fraction``, ``uplink-fitted-bytes``: the estimate above) and the ledger counts the real message.

Adaptive sparsification to a communication budget is common practice (e.g. the
bandwidth-aware top-k of Han, Wang & Leung, "Adaptive Gradient Sparsification for
Efficient Federated Learning: An Online Learning Approach", ICDCS 2020,
arXiv:2001.04756, which adapts k online); this is the simplest deterministic form:
meet a fixed target every round.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

import torch

from fedpeft.codecs.analysis import encoded_nbytes
from fedpeft.codecs.base import Chain, CodecContext, CodecState, Payload
from fedpeft.codecs.tensors import encode_tensors
from fedpeft.codecs.topk import TopK
from fedpeft.errors import ConfigError

STEPS = 14
"""Encodings tried per round (bisection on ``log f``: the fraction to within ~0.1 % of
the range's log-width; about ``STEPS ×`` one encoding's time)."""


def tunable(chain: Chain) -> int:
    """Index of the chain's ``topk`` stage.

    Raises:
        ConfigError: the chain has no ``topk`` stage, or more than one.
    """
    found = [i for i, s in enumerate(chain.stages) if isinstance(s, TopK)]
    if len(found) != 1:
        raise ConfigError(
            "budget.bytes-per-round tunes the one 'topk' stage of codec.uplink, e.g. "
            f"'topk:0.05+int8+zstd'; got {chain.name!r}"
        )
    return found[0]


def with_fraction(chain: Chain, fraction: float) -> Chain:
    """``chain`` with its ``topk`` stage keeping ``fraction`` of each tensor."""
    i = tunable(chain)
    stages = list(chain.stages)
    stages[i] = TopK(fraction=fraction)
    return dataclasses.replace(chain, stages=tuple(stages))


@dataclasses.dataclass(frozen=True)
class Fitted:
    """The encoding chosen for a bytes target.

    Attributes:
        payload: the encoded payload.
        state: the chain's new state for that encoding.
        fraction: the ``topk`` fraction used.
        nbytes: ``encoded_nbytes(payload)``.
    """

    payload: Payload
    state: CodecState
    fraction: float
    nbytes: int


def encode_within(
    tensors: Mapping[str, torch.Tensor],
    chain: Chain,
    state: CodecState,
    ctx: CodecContext,
    target: int,
) -> Fitted:
    """Encode ``tensors`` with the largest ``topk`` fraction that fits ``target`` bytes."""
    largest = max((t.numel() for t in tensors.values() if t.is_floating_point()), default=1)
    f_min = min(1.0, 1.0 / max(largest, 1))

    def attempt(fraction: float) -> Fitted:
        payload, new_state = encode_tensors(tensors, with_fraction(chain, fraction), dict(state), ctx)
        return Fitted(payload, new_state, fraction, encoded_nbytes(payload))

    best = attempt(f_min)
    if best.nbytes > target:
        return best  # cannot fit: send the least; the reported bytes show the miss
    whole = attempt(1.0)
    if whole.nbytes <= target:
        return whole
    lo, hi = math.log(f_min), 0.0  # fits at lo, not at hi
    for _ in range(STEPS - 2):
        mid = attempt(math.exp((lo + hi) / 2))
        if mid.nbytes <= target:
            best, lo = mid, math.log(mid.fraction)
        else:
            hi = math.log(mid.fraction)
    return best
