"""Errors the store raises. Messages name the file and say how to fix it."""

from __future__ import annotations

from astrea.errors import AstreaError


class StoreError(AstreaError, ValueError):
    """A store that cannot be read or written as asked (uncommitted unit, corrupt file, name clash...).

    Also a ValueError so callers guarding store look-ups with ``except ValueError`` keep working; the
    CLI's ``user_errors`` prints it as one line.
    """


class UnitCommittedError(StoreError):
    """Writing a unit that is already committed: committed units are immutable."""


class UnitBusyError(StoreError):
    """Writing a unit that a live process on this host is writing: one writer per unit."""


class DamagedRowError(StoreError):
    """A committed row that cannot be used: its bytes no longer hash to the index checksum, its container
    cannot be decoded there, or it holds inf/NaN. ``unit``, ``key``, ``path`` and ``reason`` say which."""

    def __init__(self, message: str, *, path: str, unit: str, key: str, reason: str):
        super().__init__(message)
        self.path, self.unit, self.key, self.reason = path, unit, key, reason
