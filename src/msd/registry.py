"""Registries: the one place to add a divergence, weighting, judge, backend, dataset, model source,
language or model family.

    DIVERGENCES = Registry("divergence", where="loss.divergence")

    @DIVERGENCES.register("rkl")
    def kl_student_teacher(...): ...

    DIVERGENCES.get("rkl")      # the entry; an unknown name is a one-line MsdError with the choices
    DIVERGENCES.names()         # what config choices and --help list

Entries come from three places, all loaded before the first lookup: the module that defines
the registry (its built-ins), the modules of a `discover` package (one file per entry: a judge,
a dataset family), and plugins (`msd.plugins`: the model organism, a user's installed package,
a test that calls `register` itself). The core never imports a plugin.
"""

from __future__ import annotations

import importlib
import pkgutil
import sys
from typing import Callable, Generic, Iterator, TypeVar

from msd.errors import MsdError, closest, printable

T = TypeVar("T")
_ALL: list["Registry"] = []  # every registry, so a failing plugin's entries can be taken back


class Registry(Generic[T]):
    """Name -> entry. `where` names the config key or CLI flag an unknown name is blamed on."""

    def __init__(self, kind: str, *, where: str | None = None, discover: str | None = None):
        self.kind = kind
        self.where = where
        self.discover = discover  # a package whose modules register entries when imported
        self._entries: dict[str, T] = {}
        self._discovered = False
        _ALL.append(self)

    # -- adding ---------------------------------------------------------------------------
    def register(self, name: str, entry: T | None = None, *, replace: bool = False):
        """Add `entry` under `name`; without `entry`, a decorator that adds what it decorates."""
        def add(value: T) -> T:
            if name in self._entries and not replace and self._entries[name] is not value:
                raise ValueError(f"{self.kind} {name!r} is registered already")
            self._entries[name] = value
            return value

        return add if entry is None else add(entry)

    def unregister(self, name: str) -> None:
        self._entries.pop(name, None)

    # -- looking up -----------------------------------------------------------------------
    def _load(self) -> None:
        if not self._discovered:
            self._discovered = True
            if self.discover:
                package = importlib.import_module(self.discover)
                for info in pkgutil.iter_modules(package.__path__):
                    if not info.name.startswith("_"):
                        importlib.import_module(f"{self.discover}.{info.name}")
        load_plugins()

    def get(self, name: str) -> T:
        if name not in self._entries:
            self._load()
        if name not in self._entries:
            raise MsdError(self.unknown(name), self.where)
        return self._entries[name]

    def unknown(self, name: str) -> str:
        hint = closest(str(name), self._entries)
        return (f"unknown {self.kind} {name!r}; choose from {', '.join(self.names())}"
                + (f" (did you mean {hint!r}?)" if hint else ""))

    def names(self) -> list[str]:
        self._load()
        return list(self._entries)

    def items(self) -> list[tuple[str, T]]:
        self._load()
        return list(self._entries.items())

    def __contains__(self, name: object) -> bool:
        if name not in self._entries:
            self._load()
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self.names())


_plugins = {"loaded": False}


def load_plugins() -> None:
    """Import every plugin (`msd.plugins.names`) once, each alone: one that fails is named in
    one warning line and skipped, and what it registered before failing is taken back.
    Re-entrant: a plugin's own registry lookups see what is loaded so far."""
    if _plugins["loaded"]:
        return
    _plugins["loaded"] = True
    from msd import plugins

    for part in plugins.PARTS:  # msd's own: they load always, and a failure is msd's bug
        importlib.import_module(part)
    for name in plugins.names():
        module = name.split(":")[0].strip()
        saved = [(reg, dict(reg._entries)) for reg in _ALL]
        try:
            importlib.import_module(module)
        except (Exception, SystemExit) as e:  # noqa: BLE001 - whatever a plugin raises, it fails alone
            for reg, entries in saved:
                reg._entries = entries
            sys.modules.pop(module, None)
            reason = printable(" ".join(f"{type(e).__name__}: {e}".split())[:300])
            print(f"msd: warning: plugin {printable(module)!r} skipped ({reason})", file=sys.stderr)


def choices(registry: Registry) -> Callable[[], list[str]]:
    """A callable giving the registry's names (for config choices computed at check time)."""
    return registry.names
