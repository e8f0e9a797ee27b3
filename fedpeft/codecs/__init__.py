"""Wire codecs: composable encodings of tensor dicts (no Flower import).

A codec spec is a chain of stages joined by ``+``, a stage's parameter after ``:``,
e.g. ``"identity"`` or ``"topk:0.05+int8+zstd"``. See :func:`build_codec`.
Importing this package registers every built-in stage: ``identity``, ``fp16``,
``bf16``, ``int8``, ``int4``, ``int2``, ``ternary``, ``sign``, ``topk``, ``lowrank``,
``ferret`` and ``zstd``.
"""

from fedpeft.codecs.base import (
    Chain,
    Codec,
    CodecContext,
    Payload,
    available_codecs,
    build_codec,
    from_payload,
    register_codec,
    to_payload,
)
from fedpeft.codecs.cast import HalfCast
from fedpeft.codecs.ferret import FerretProjection
from fedpeft.codecs.identity import Identity
from fedpeft.codecs.lowrank import PowerSgdLowRank
from fedpeft.codecs.quantize import StochasticQuantizer
from fedpeft.codecs.sign import ScaledSign
from fedpeft.codecs.ternary import TernaryQuantizer
from fedpeft.codecs.topk import TopK
from fedpeft.codecs.zstd import Zstd

__all__ = [
    "Chain",
    "Codec",
    "CodecContext",
    "FerretProjection",
    "HalfCast",
    "Identity",
    "Payload",
    "PowerSgdLowRank",
    "ScaledSign",
    "StochasticQuantizer",
    "TernaryQuantizer",
    "TopK",
    "Zstd",
    "available_codecs",
    "build_codec",
    "from_payload",
    "register_codec",
    "to_payload",
]
