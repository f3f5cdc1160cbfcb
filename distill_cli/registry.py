"""Name -> factory registries for datasets, models and losses (timm-style `@register`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

from .errors import DistillError, did_you_mean

F = TypeVar("F", bound=Callable)


class Registry(Generic[F]):
    """A named table of factories; unknown names fail with the closest valid names suggested."""

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, F] = {}

    def register(self, name: str) -> Callable[[F], F]:
        def add(fn: F) -> F:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} registered twice")
            self._entries[name] = fn
            return fn

        return add

    def get(self, name: str) -> F:
        try:
            return self._entries[name]
        except KeyError:
            raise DistillError(f"unknown {self.kind} {name!r}: {did_you_mean(name, self._entries)}") from None

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries
