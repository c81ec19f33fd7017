"""A small name -> entry registry: every selectable part of a method (advantage estimator, loss aggregation, clipping
rule, preference loss, unlearning objective, adapter variant) registers one entry next to its function.

The recipe schema's allowed values come from :meth:`Registry.names`, and trainers read what they need from the
selected entry (its function and its ``meta``) instead of comparing names. Adding a part is one function, one
``@REGISTRY.register(...)`` and its unit test, in one file (docs/contributing.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Generic, Iterator, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class Entry(Generic[T]):
    """One registered part: ``name`` (the recipe value), ``fn`` (the function or class), ``doc`` (docs/methods page,
    e.g. ``docs/methods/grpo_advantages.md#group-advantage``) and free-form ``meta`` the trainers read."""

    name: str
    fn: T
    doc: str
    meta: dict[str, Any] = field(default_factory=dict)

    def __getattr__(self, key: str) -> Any:
        meta = object.__getattribute__(self, "meta")
        if key in meta:
            return meta[key]
        raise AttributeError(f"{type(self).__name__} {object.__getattribute__(self, 'name')!r} has no {key!r}")


class Registry(Generic[T]):
    """Ordered ``name -> Entry``; ``kind`` names the recipe key it serves (for error messages)."""

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, Entry[T]] = {}

    def register(self, name: str, *, doc: str, **meta: Any) -> Callable[[T], T]:
        """Decorator: register ``fn`` under ``name`` (returns ``fn`` unchanged)."""

        def decorate(fn: T) -> T:
            self.add(name, fn, doc=doc, **meta)
            return fn

        return decorate

    def add(self, name: str, fn: T, *, doc: str, **meta: Any) -> Entry[T]:
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} registered twice")
        entry = Entry(name, fn, doc, dict(meta))
        self._entries[name] = entry
        return entry

    def remove(self, name: str) -> None:
        """Drop an entry (tests that register a toy part clean up with this)."""
        self._entries.pop(name, None)

    def __getitem__(self, name: str) -> Entry[T]:
        try:
            return self._entries[name]
        except KeyError:
            raise ValueError(f"unknown {self.kind} {name!r}; known: {self.names()}") from None

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[Entry[T]]:
        return iter(list(self._entries.values()))

    def __len__(self) -> int:
        return len(self._entries)

    def names(self) -> tuple[str, ...]:
        return tuple(self._entries)
