"""LoRA state dicts that travel between ComfyUI nodes (`LORA_MODEL` sockets) with extra facts.

ComfyUI's `LORA_MODEL` is a plain `dict[str, Tensor]`. Two dict subclasses keep that contract
while carrying what our nodes need, as attributes (a dict subclass is still accepted by every
consumer of the socket: core's "Load LoRA Model" and "Save LoRA", our own nodes):

- `LoadedLora`: a LoRA read from a file, with the file's path and its parsed `LoraFile`, so the
  merge node need not parse the keys again and can name the file in metadata and errors.
- `LazyMergedLora`: the merge node's merged LoRA. Materialising it (concatenating both sides'
  factors for all 722+ layers, rank r_c + r_s, float32) costs about a second and twice the
  LoRAs' memory, and most workflows never use this output. So the tensors are built on first
  access; the keys are known at once. It also carries `provenance` (the `MergedLora` and what
  it was made from) so "Save Merged LoRA" can stream it to disk with full metadata without
  ever materialising it.

Until first access the underlying dict storage is empty; every dict method that reads values
is overridden to materialise first. C code that bypasses Python methods on dict subclasses
(`PyDict_Next`) would see an empty dict; ComfyUI and safetensors do not do that (they call
`.items()`, `.keys()`, `in`, `[]`), and `LazyMergedLora.materialise()` exists for any caller that
needs a plain dict.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ..lora import LoraFile
from ..merged import MergedLora


class LoadedLora(dict):
    """A LoRA state dict read from `path`, with its parsed form (`lora_file`)."""

    def __init__(self, tensors: dict[str, torch.Tensor], path: Path | None, lora_file: LoraFile | None,
                 name: str = ""):
        super().__init__(tensors)
        self.path = path
        self.name = name or (path.name if path else "")
        self.lora_file = lora_file


@dataclass
class MergeProvenance:
    """What a merged LoRA was made from (for the saved file's metadata)."""

    merged: MergedLora
    content_name: str = ""
    content_path: Path | None = None
    style_name: str = ""
    style_path: Path | None = None
    hypernet_name: str = ""
    hypernet_path: Path | None = None


_MATERIALISE_LOCK = threading.Lock()


class LazyMergedLora(dict):
    """A kohya LoRA state dict whose tensors are computed on first read of any value."""

    def __init__(self, keys: list[str], build: Callable[[], dict[str, torch.Tensor]],
                 provenance: MergeProvenance | None = None):
        super().__init__()
        # A dict of the promised keys (values unused): O(1) `in` and a real keys view, which
        # ComfyUI's load_lora queries once per model weight.
        self._lazy_keys = dict.fromkeys(keys)
        self._build: Callable[[], dict[str, torch.Tensor]] | None = build
        self.provenance = provenance

    @classmethod
    def from_merged(cls, merged: MergedLora, provenance: MergeProvenance | None = None,
                    dtype: torch.dtype = torch.float32) -> "LazyMergedLora":
        keys = [key for key, *_ in merged.kohya_entries(dtype)]
        return cls(keys, lambda: merged.to_state_dict(dtype), provenance)

    @property
    def is_materialised(self) -> bool:
        return self._build is None

    def materialise(self) -> dict[str, torch.Tensor]:
        """Build the tensors now (once); returns a plain dict with the same items."""
        if self._build is not None:
            with _MATERIALISE_LOCK:
                if self._build is not None:
                    data = self._build()
                    if list(data) != list(self._lazy_keys):
                        raise RuntimeError("lazy merged LoRA: built keys differ from the promised keys")
                    dict.update(self, data)
                    self._build = None
        return dict(dict.items(self))

    def _ready(self) -> None:
        if self._build is not None:
            self.materialise()

    # Reads that need only the keys: answered without building anything.
    def __len__(self) -> int:
        return len(self._lazy_keys) if self._build is not None else dict.__len__(self)

    def __iter__(self):
        return iter(list(self._lazy_keys)) if self._build is not None else dict.__iter__(self)

    def __contains__(self, key) -> bool:
        return key in self._lazy_keys if self._build is not None else dict.__contains__(self, key)

    def keys(self):
        return self._lazy_keys.keys() if self._build is not None else dict.keys(self)

    # Reads of values, and every mutation: build first, then behave as a plain dict.
    def __getitem__(self, key):
        self._ready()
        return dict.__getitem__(self, key)

    def get(self, key, default=None):
        self._ready()
        return dict.get(self, key, default)

    def values(self):
        self._ready()
        return dict.values(self)

    def items(self):
        self._ready()
        return dict.items(self)

    def copy(self) -> dict:
        return self.materialise()

    # dict's C implementation of `|` copies the storage directly, bypassing the methods above.
    def __or__(self, other):
        return self.materialise() | other

    def __ror__(self, other):
        return other | self.materialise()

    def __eq__(self, other) -> bool:
        self._ready()
        return dict.__eq__(self, other)

    __hash__ = None  # dicts are unhashable; keep it so after defining __eq__

    def __repr__(self) -> str:
        state = "built" if self._build is None else "not built yet"
        return f"<LazyMergedLora {len(self)} tensors, {state}>"

    def __reduce_ex__(self, protocol):
        # Pickling/copying gives a plain dict with the tensors (the provenance is not portable).
        return (dict, (self.materialise(),))

    def _mutating(name):  # noqa: N805 — builds the overriding methods below
        def method(self, *args, **kwargs):
            self._ready()
            self.provenance = None  # edited by someone else: our metadata no longer describes it
            return getattr(dict, name)(self, *args, **kwargs)
        method.__name__ = name
        return method

    __setitem__ = _mutating("__setitem__")
    __delitem__ = _mutating("__delitem__")
    pop = _mutating("pop")
    popitem = _mutating("popitem")
    setdefault = _mutating("setdefault")
    update = _mutating("update")
    clear = _mutating("clear")
    __ior__ = _mutating("__ior__")
    del _mutating
