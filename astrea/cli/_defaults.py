"""CLI options whose default is read from the config field they set, so each default is written once.

Two kinds, by what importing the config costs:

- :func:`field_option`: the option's default *is* the field's default (a cheap config module:
  ``ExtractConfig``, ``EstimateConfig``); ``--help`` shows it as typer always does.
- :func:`unset_option`: the option defaults to None = "not given: the config decides" (a file, then the
  dataclass). Its ``--help`` shows the field's default, looked up only when the help is rendered, because
  those configs (``TrainConfig``, ``EvalConfig``, ``GenerateConfig``) import torch and ``astrea`` must
  start without it.

Both record the field on the option (``config_field``): tests/cli/test_defaults.py walks every command
and checks each default against the field it names, and any other literal default against a field of
the same name, so a literal that disagrees with the config fails there.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
from typing import Any

import typer


def field_default(target: str) -> Any:
    """The default of ``"module:Class.field[.sub]"`` (nested dataclass fields) or ``"module:function.param"``.

    ``field_default("astrea.train.config:TrainConfig.optim.lr")`` -> ``1e-4``.
    """
    module, sep, path = target.partition(":")
    if not sep or not path:
        raise ValueError(f"config field {target!r}: write 'module:Class.field'")
    owner_name, *names = path.split(".")
    owner: Any = getattr(importlib.import_module(module), owner_name)
    if not names:
        raise ValueError(f"config field {target!r}: name a field of {owner_name}")
    value: Any = owner
    for name in names:
        value = _default_of(value, name, target)
    return value


def _default_of(owner: Any, name: str, target: str) -> Any:
    if dataclasses.is_dataclass(owner):
        fields = {f.name: f for f in dataclasses.fields(owner)}
        if name not in fields:
            owner_name = owner.__name__ if isinstance(owner, type) else type(owner).__name__
            raise ValueError(f"config field {target!r}: {owner_name} has no field {name!r}")
        f = fields[name]
        if f.default is not dataclasses.MISSING:
            return f.default
        if f.default_factory is not dataclasses.MISSING:
            return f.default_factory()
        raise ValueError(f"config field {target!r}: {name} has no default")
    if callable(owner):
        p = inspect.signature(owner).parameters.get(name)
        if p is None or p.default is inspect.Parameter.empty:
            raise ValueError(f"config field {target!r}: {owner.__name__} has no parameter {name!r} with a default")
        return p.default
    raise ValueError(f"config field {target!r}: {name!r} is not inside a dataclass")


def show(value: Any) -> str:
    """A default as a user writes it in a config file or on the command line."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | tuple):
        return ",".join(show(v) for v in value)
    return str(value)


class ShownDefault(str):
    """``show_default`` text rendered from the field only when formatted (typer formats it when printing
    ``--help``), so building the command imports no config module."""

    target: str

    def __new__(cls, target: str) -> "ShownDefault":
        self = super().__new__(cls, target)
        self.target = target
        return self

    def __str__(self) -> str:
        return show(field_default(self.target))

    def __format__(self, spec: str) -> str:
        return format(str(self), spec)


def field_option(target: str, *param_decls: str, **kwargs: Any) -> Any:
    """A typer option defaulting to the value of the field ``target`` (see :func:`field_default`)."""
    info = typer.Option(field_default(target), *param_decls, **kwargs)
    info.config_field = target  # type: ignore[attr-defined]
    return info


def unset_option(target: str, *param_decls: str, shown: bool = True, **kwargs: Any) -> Any:
    """A typer option defaulting to None ("not given": the config decides); ``--help`` shows the field's
    default unless ``shown=False`` (an empty default such as ``address: ""`` has nothing to show)."""
    if shown:
        kwargs["show_default"] = ShownDefault(target)
    info = typer.Option(None, *param_decls, **kwargs)
    info.config_field = target  # type: ignore[attr-defined]
    return info


def bound_overrides(command: Any, values: dict[str, Any]) -> dict[str, Any]:
    """Dotted config overrides from a command's arguments: every option made by :func:`unset_option` or
    :func:`field_option` sets the field it names, so the flag -> field mapping is written once, on the
    option. ``values`` is the command's ``locals()``; paths become strings, None stays "not given"."""
    from pathlib import PurePath

    out: dict[str, Any] = {}
    for name, p in inspect.signature(command).parameters.items():
        target = getattr(p.default, "config_field", None)
        if target is None:
            continue
        value = values[name]
        out[target.partition(":")[2].split(".", 1)[1]] = str(value) if isinstance(value, PurePath) else value
    return out
