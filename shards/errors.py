"""Errors the store raises. Messages name the file and say how to fix it."""

from __future__ import annotations

from astrea.cli._common import AstreaError


class StoreError(AstreaError, ValueError):
    """A store that cannot be read or written as asked (uncommitted unit, corrupt file, name clash...).

    Also a ValueError so callers that guard store look-ups with ``except ValueError`` keep working.
    """


class UnitCommittedError(StoreError):
    """Writing a unit that is already committed: committed units are immutable."""
