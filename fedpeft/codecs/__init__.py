"""Wire codecs: composable encodings of tensor dicts (no Flower import).

A codec spec is a chain of stages joined by ``+``, a stage's parameter after ``:``,
e.g. ``"identity"`` or ``"topk:0.05+int8+zstd"``. See :func:`build_codec`.
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
from fedpeft.codecs.identity import Identity

__all__ = [
    "Chain",
    "Codec",
    "CodecContext",
    "Identity",
    "Payload",
    "available_codecs",
    "build_codec",
    "from_payload",
    "register_codec",
    "to_payload",
]
