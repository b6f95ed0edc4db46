"""The trainer's user-facing error: one line saying what is wrong and how to fix it."""

from __future__ import annotations

from astrea.errors import AstreaError


class TrainError(AstreaError):
    """Bad input found before any training step (store, fingerprints, config, resume mismatch)."""
