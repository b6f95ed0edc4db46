"""Shared CLI plumbing: turn astrea's expected errors into one clear line and a non-zero exit."""

from __future__ import annotations

import errno
import functools
from collections.abc import Callable
from typing import Any, TypeVar

import typer

from astrea.errors import USER_ERRORS, AstreaError

__all__ = ["AstreaError", "user_errors"]

F = TypeVar("F", bound=Callable[..., Any])


_FS_ERRNOS = {errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EISDIR, errno.EDQUOT, errno.EIO,
              errno.ENAMETOOLONG, errno.ELOOP}


def user_errors(fn: F) -> F:
    """Print user-facing errors (``astrea.errors.USER_ERRORS``) as `error: ...` (no traceback), exit 2."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except USER_ERRORS as e:
            msg = e.args[0] if e.args else str(e)
            typer.echo(f"error: {msg}", err=True)
            raise typer.Exit(2) from None
        except OSError as e:
            if e.errno == errno.ENOSPC:
                typer.echo(
                    f"error: no space left on device ({e.filename or 'store'}). Nothing committed was lost; "
                    "free space (or point --store at a larger disk) and rerun: finished units are skipped.",
                    err=True,
                )
                raise typer.Exit(2) from None
            if e.errno in _FS_ERRNOS:
                # The filesystem refused (read-only, permissions, a file where a folder should be...):
                # the path and the reason say it all; a traceback would add nothing.
                where = f" ({e.filename})" if e.filename else ""
                typer.echo(f"error: {e.strerror or type(e).__name__}{where}. Nothing committed was lost; "
                           "fix the path or its permissions and rerun", err=True)
                raise typer.Exit(2) from None
            raise

    return wrapper  # type: ignore[return-value]
