"""A small cache keyed by the identity of its input objects (the nodes' caches)."""

from __future__ import annotations

from collections.abc import Callable


class IdentityCache:
    """A few results keyed by the identity of their input objects (and the equality of an
    optional plain `key`, e.g. a method name and its parameters).

    Holds strong references to the inputs, so an id can never be reused by another object while
    its entry lives (a plain `id()` key could silently match a new dict at the same address).
    Entries keep LoRAs alive, so the caches below are small: two entries serve two merge nodes
    in one workflow (e.g. lorarar vs sum) without recomputing, and retain no more LoRAs than
    ComfyUI's own output cache does.
    """

    def __init__(self, size: int = 2):
        self.size = size
        self._entries: list[tuple[tuple, tuple, object]] = []
        self.hits = self.misses = 0

    def get_or_compute(self, objects: tuple, compute: Callable[[], object], key: tuple = ()):
        for index, (held, held_key, value) in enumerate(self._entries):
            if len(held) == len(objects) and all(a is b for a, b in zip(held, objects)) and held_key == key:
                self._entries.append(self._entries.pop(index))
                self.hits += 1
                return value
        self.misses += 1
        value = compute()
        self._entries.append((objects, key, value))
        del self._entries[:-self.size]
        return value

    def clear(self) -> None:
        self._entries.clear()

