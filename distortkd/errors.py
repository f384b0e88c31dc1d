"""The one error type that the CLIs print as a single line instead of a traceback."""

from __future__ import annotations

from collections.abc import Iterable


class UserError(ValueError):
    """A mistake in what the user asked for (a name, a value, a path), told in one line."""


def unknown(kind: str, value: object, accepted: Iterable[str]) -> UserError:
    """Builds the standard 'unknown X' error naming the bad value and the accepted ones."""
    return UserError(f"unknown {kind} {value!r}; accepted: {', '.join(sorted(accepted))}")
