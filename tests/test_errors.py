"""One error root: every user-facing error is an ``AstreaError`` (the CLI and the extraction job read
that one type), and keeps the builtin base callers guard with."""

from __future__ import annotations

import subprocess
import sys

import pytest

from astrea.data import DataError
from astrea.errors import USER_ERRORS, AstreaError
from astrea.extract import ExtractConfigError, ExtractError
from astrea.extract.experts.base import BadImageError, WeightsUnavailableError
from astrea.registry import UnknownNameError
from astrea.schemas import SpecError
from astrea.shards.errors import DamagedRowError, StoreError
from astrea.train.errors import TrainError


@pytest.mark.parametrize("cls,builtin", [
    (StoreError, ValueError), (DamagedRowError, ValueError), (SpecError, ValueError), (DataError, ValueError),
    (ExtractConfigError, ValueError), (BadImageError, ValueError), (ExtractError, RuntimeError),
    (WeightsUnavailableError, RuntimeError), (UnknownNameError, KeyError), (TrainError, Exception),
])
def test_user_errors_share_one_root(cls, builtin):
    assert issubclass(cls, AstreaError) and issubclass(cls, builtin)
    assert issubclass(cls, USER_ERRORS)


def test_errors_module_imports_nothing_of_the_project():
    """The lowest layer: importing it must not pull in any other astrea module."""
    code = ("import sys, astrea.errors; "
            "print(sorted(m for m in sys.modules if m.startswith('astrea') and m not in ('astrea', 'astrea.errors')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_cli_prints_any_astrea_error_as_one_line(capsys):
    import typer

    from astrea.cli._common import user_errors

    class _Custom(AstreaError):
        pass

    @user_errors
    def cmd() -> None:
        raise _Custom("what went wrong; how to fix it")

    with pytest.raises(typer.Exit) as ei:
        cmd()
    assert ei.value.exit_code == 2
    assert capsys.readouterr().err.strip() == "error: what went wrong; how to fix it"
