"""Registry[T]: name -> object, with lazy "module:attr" entries and close-match errors. Names that share a prefix can
form a family (the 57 `mmlu_<subject>` tasks): an unknown name with the prefix gets the family's closest names, and
the list of what is available shows the family as one entry."""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from budgetlm.errors import UnknownNameError, suggest, unknown

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T | str] = {}
        self._families: dict[str, str] = {}  # prefix -> what one member is ("MMLU subject")

    def register(self, name: str) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            self._items[name] = obj
            return obj

        return deco

    def add(self, name: str, obj: T | str) -> None:
        """Add an object, or a lazy 'module:attr' string resolved on first use."""
        self._items[name] = obj

    def add_family(self, prefix: str, what: str) -> None:
        """The names starting with `prefix` are a family of `what`s."""
        self._families[prefix] = what

    def unknown_error(self, name: str) -> UnknownNameError:
        """The error for a name not registered: close matches, and what is available (a family as one entry)."""
        families = {p: [n for n in self._items if n.startswith(p)] for p in self._families}
        for prefix, members in families.items():
            if name.startswith(prefix) and members:
                closest = difflib.get_close_matches(name, members, n=3, cutoff=0.0)
                return UnknownNameError(
                    f"unknown {self._families[prefix]} '{name[len(prefix) :]}' ({self.kind} '{name}'); closest: "
                    f"{', '.join(closest)}; `budgetlm {self.kind}s` lists all {len(members)} {prefix}* names"
                )
        if not families:
            return unknown(self.kind, name, self._items)
        in_family = {n for members in families.values() for n in members}
        shown = sorted(n for n in self._items if n not in in_family)
        shown += [f"{p}* ({len(m)} names)" for p, m in families.items() if m]
        return UnknownNameError(
            f"unknown {self.kind} '{name}'{suggest(name, self._items)}; available: {', '.join(shown)}"
        )

    def get(self, name: str) -> T:
        if name not in self._items:
            raise self.unknown_error(name)
        obj = self._items[name]
        if isinstance(obj, str):
            module, _, attr = obj.partition(":")
            obj = getattr(importlib.import_module(module), attr)
            self._items[name] = obj
        return obj

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
