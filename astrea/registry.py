"""Name -> factory registries, resolved lazily.

Entries are registered as ``"module.path:attribute"`` strings so that listing the experts or
datasets never imports torch, open_clip or sam2; the import happens when a name is resolved.
An unknown name raises :class:`UnknownNameError` listing the valid ones (timm's create_model
and open_clip's model configs behave the same way).
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Iterator
from typing import Any, Generic, TypeVar

from astrea.errors import AstreaError

T = TypeVar("T")


class UnknownNameError(AstreaError, KeyError):
    """A name that is not in a registry; the message lists the valid names."""

    def __init__(self, kind: str, name: str, valid: list[str]):
        self.kind, self.name, self.valid = kind, name, valid
        close = difflib.get_close_matches(name, valid, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        super().__init__(f"unknown {kind} {name!r}.{hint} Valid {kind} names: {', '.join(sorted(valid))}")

    def __str__(self) -> str:  # KeyError would repr() the message
        return self.args[0]


class Registry(Generic[T]):
    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, str | T] = {}
        self._help: dict[str, str] = {}

    def register(self, name: str, target: str | T, help: str = "") -> None:
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self._entries[name] = target
        self._help[name] = help

    def get(self, name: str) -> T:
        if name not in self._entries:
            raise UnknownNameError(self.kind, name, list(self._entries))
        target = self._entries[name]
        if isinstance(target, str):
            # "pkg.module:attr" resolves to an attribute, "pkg.module" to the module itself.
            module, _, attr = target.partition(":")
            mod = importlib.import_module(module)
            target = getattr(mod, attr) if attr else mod
            self._entries[name] = target
        return target  # type: ignore[return-value]

    def help(self, name: str) -> str:
        if name not in self._entries:
            raise UnknownNameError(self.kind, name, list(self._entries))
        return self._help[name]

    def names(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {self.names()})"


def check_choice(field: str, value: Any, valid: list[Any] | tuple[Any, ...]) -> None:
    """Raise a ValueError naming the config field when ``value`` is not one of ``valid``."""
    if value not in valid:
        raise ValueError(f"{field}={value!r} is not valid; choose one of {list(valid)}")
