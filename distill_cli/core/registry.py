"""Name -> factory registries for datasets, models and losses (timm-style `@register`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

from .errors import DistillError, did_you_mean

F = TypeVar("F", bound=Callable)


class Registry(Generic[F]):
    """A named table of factories; unknown names fail with the closest valid names suggested."""

    def __init__(self, kind: str, populate: Callable[[], None] | None = None):
        """`populate` imports the modules that register entries; it runs on the first look-up."""
        self.kind = kind
        self._entries: dict[str, F] = {}
        self._populate = populate

    def _loaded(self) -> dict[str, F]:
        if self._populate is not None:
            populate, self._populate = self._populate, None
            populate()
        return self._entries

    def register(self, name: str) -> Callable[[F], F]:
        def add(fn: F) -> F:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} registered twice")
            self._entries[name] = fn
            return fn

        return add

    def get(self, name: str) -> F:
        entries = self._loaded()
        try:
            return entries[name]
        except KeyError:
            raise DistillError(f"unknown {self.kind} {name!r}: {did_you_mean(name, entries)}") from None

    def names(self) -> list[str]:
        return sorted(self._loaded())

    def __contains__(self, name: str) -> bool:
        return name in self._loaded()
