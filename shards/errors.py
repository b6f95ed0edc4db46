"""Errors the store raises. Messages name the file and say how to fix it."""

from __future__ import annotations


class StoreError(ValueError):
    """A store that cannot be read or written as asked (uncommitted unit, corrupt file, name clash...).

    A ValueError so callers guarding store look-ups with ``except ValueError`` keep working; the CLI's
    ``user_errors`` prints it as one line. (Not an ``AstreaError``: that lives in ``astrea.cli``, whose
    import pulls in every command module, too heavy for the writer and reader processes.)
    """


class UnitCommittedError(StoreError):
    """Writing a unit that is already committed: committed units are immutable."""


class UnitBusyError(StoreError):
    """Writing a unit that a live process on this host is writing: one writer per unit."""
