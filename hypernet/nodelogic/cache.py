"""A small cache keyed by the identity of its input objects (the nodes' caches)."""

from __future__ import annotations

import weakref
from collections.abc import Callable


def _hold(obj: object):
    """A reference that lets ComfyUI free `obj` where one can be weak (our LoRA and hypernetwork
    objects, LoraFiles), else a strong one (a plain dict from another node cannot be weakly
    referenced)."""
    try:
        return weakref.ref(obj)
    except TypeError:
        return lambda: obj


class IdentityCache:
    """A few results keyed by the identity of their input objects (and the equality of an
    optional plain `key`, e.g. a method name and its parameters).

    Inputs are held weakly where they can be: when ComfyUI's own cache lets go of a node's outputs
    (its cache settings decide: `--cache-none`, `--cache-lru`, a changed input), the entries built
    on them go too, instead of keeping their merges — and the LoRAs' tensors behind them — alive.
    An entry whose input is gone is dropped before its id could match a new object. Inputs that
    cannot be weakly referenced are held strongly, so their ids are never reused while the entry
    lives. `size` bounds the entries either way: two serve two merge nodes in one workflow (e.g.
    lorarar vs sum) without recomputing.
    """

    def __init__(self, size: int = 2):
        self.size = size
        self._entries: list[tuple[tuple, tuple, object]] = []
        self.hits = self.misses = 0

    def _live(self) -> None:
        self._entries = [e for e in self._entries
                         if not any(isinstance(ref, weakref.ref) and ref() is None for ref in e[0])]

    def __len__(self) -> int:
        self._live()
        return len(self._entries)

    def get_or_compute(self, objects: tuple, compute: Callable[[], object], key: tuple = ()):
        self._live()
        for index, (held, held_key, value) in enumerate(self._entries):
            if len(held) == len(objects) and all(ref() is obj for ref, obj in zip(held, objects)) and held_key == key:
                self._entries.append(self._entries.pop(index))
                self.hits += 1
                return value
        self.misses += 1
        value = compute()
        self._entries.append((tuple(_hold(obj) for obj in objects), key, value))
        del self._entries[:-self.size]
        return value

    def clear(self) -> None:
        self._entries.clear()
