"""The one exception hierarchy of fedpeft.

Every message names the field or key, the value received, what was expected and,
where it helps, the next step (STYLE.md §2.6).
"""

from __future__ import annotations

from collections.abc import Sequence


class FedPeftError(Exception):
    """Base class of every error fedpeft raises on purpose."""


class ConfigError(FedPeftError):
    """One or more configuration values are invalid.

    Args:
        problems: every problem found, one human-readable line each. All of them are
            reported at once so a user fixes a config in one pass.
    """

    def __init__(self, problems: Sequence[str] | str) -> None:
        if isinstance(problems, str):
            problems = [problems]
        self.problems: list[str] = list(problems)
        if len(self.problems) == 1:
            message = self.problems[0]
        else:
            lines = "\n".join(f"  - {p}" for p in self.problems)
            message = f"{len(self.problems)} configuration problems:\n{lines}"
        super().__init__(message)


class IncompatibleUpdateError(FedPeftError):
    """A client update does not match what the server expected from that client."""


class CodecError(FedPeftError):
    """A payload cannot be encoded or decoded by the configured codec."""


class RegistryError(FedPeftError):
    """A registry lookup or registration failed (unknown or duplicate name)."""
