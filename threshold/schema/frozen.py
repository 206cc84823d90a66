"""A read-only mapping for parsed config values that copies as itself."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Generic, TypeVar

__all__ = ["FrozenMap"]

V = TypeVar("V")


class FrozenMap(Mapping[str, V], Generic[V]):
    """A read-only mapping that, being immutable, copies as itself.

    (``MappingProxyType`` is read-only too, but cannot be deep-copied, so a
    config holding one could not go through ``dataclasses.asdict``.)
    Subclasses only name what they hold (``EgressPolicies``).
    """

    __slots__ = ("_items",)

    def __init__(self, items: Mapping[str, V]) -> None:
        self._items = dict(items)

    def __getitem__(self, key: str) -> V:
        return self._items[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._items!r})"

    def __deepcopy__(self, memo: dict[int, object]) -> FrozenMap[V]:
        return self
