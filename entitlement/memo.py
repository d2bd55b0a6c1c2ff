"""Caches keyed by the identity of immutable domain objects the hot paths share (a program and
day's parameters, a decision handed out by entitlement.rules to everybody in the same situation):
what is made from such an object (its messages, its stored JSON) is made once."""

from __future__ import annotations

from typing import Any


class ByIdentity:
    """A bounded cache of what was made from an immutable domain object (a program and day's
    parameters, a shared decision): keyed by the object's identity, and keeping the object, so an id
    is never reused while its entry lives."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._entries: dict[Any, tuple[Any, Any]] = {}

    def get(self, obj: Any, *more: Any) -> Any:
        hit = self._entries.get((id(obj), *more))
        return hit[1] if hit is not None and hit[0] is obj else None

    def put(self, obj: Any, value: Any, *more: Any) -> Any:
        if len(self._entries) >= self._size:
            self._entries.clear()
        self._entries[(id(obj), *more)] = (obj, value)
        return value
