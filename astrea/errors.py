"""The root of astrea's user-facing errors: the lowest layer of the package, importing nothing of it.

Every error whose message is meant for the user (what went wrong, and how to fix it) derives from
:class:`AstreaError`: the store's, the spec's, the data sources', the extraction's, the trainer's and
the weights'. The CLI prints those as one ``error: ...`` line (astrea/cli/_common.py) and the
extraction job passes them through Ray unwrapped (extract/run.py); both read :data:`USER_ERRORS`.
Each subclass also keeps the builtin base it had (``ValueError``, ``RuntimeError``, ``KeyError``)
so callers guarding with ``except ValueError`` keep working.
"""

from __future__ import annotations


class AstreaError(Exception):
    """An error with a message meant for the user (what went wrong and how to fix it)."""


# What the CLI prints as one line and the extraction job surfaces as the user's own error. A missing
# file is the user's too: its message names the path.
USER_ERRORS: tuple[type[BaseException], ...] = (AstreaError, FileNotFoundError)
