"""``identity``: fp32 arrays sent as they are."""

from __future__ import annotations

from dataclasses import dataclass

from fedpeft.codecs.base import CodecContext, CodecState, Payload, register_codec
from fedpeft.errors import ConfigError


@dataclass(frozen=True)
class Identity:
    """Leaves the payload unchanged: ``4·numel`` bytes per tensor plus npy headers."""

    @property
    def name(self) -> str:
        """Spec ``"identity"``."""
        return "identity"

    @property
    def lossless(self) -> bool:
        """Always lossless."""
        return True

    def encode(
        self, payload: Payload, state: CodecState, ctx: CodecContext
    ) -> tuple[Payload, CodecState]:
        """Return the payload unchanged."""
        return payload, state

    def decode(self, payload: Payload, ctx: CodecContext) -> Payload:
        """Return the payload unchanged."""
        return payload


def _identity(param: str | None) -> Identity:
    if param is not None:
        raise ConfigError(f"codec 'identity' takes no parameter, got 'identity:{param}'")
    return Identity()


register_codec("identity", _identity)
