"""The pack imported as ComfyUI imports it: as a package of its own (here
`lorarar_pack_under_test`), so that `nodes/*` resolve their relative imports (`..hypernet`).

Its classes are therefore not the test's own `hypernet.*` classes (a second copy of the library
is loaded under the package name); tests compare by value or duck type, or fetch the pack's
classes with `pack_attr`.

`nodes/__init__.py` imports ComfyUI's V3 API (`comfy_api`), which the 2024 ComfyUI lacks. The
modules that only talk to ComfyUI's patching (`merge_patches`, `k_lora_patching`) do not need it,
so `pack_module(..., v3=False)` registers the `nodes` package without running its `__init__`.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGE = "lorarar_pack_under_test"


def _package() -> types.ModuleType:
    if PACKAGE not in sys.modules:
        spec = importlib.util.spec_from_file_location(PACKAGE, REPO / "__init__.py",
                                                      submodule_search_locations=[str(REPO)])
        package = importlib.util.module_from_spec(spec)
        sys.modules[PACKAGE] = package
        spec.loader.exec_module(package)
    return sys.modules[PACKAGE]


def pack_module(name: str, v3: bool = True) -> types.ModuleType:
    """`name` (e.g. "nodes.merge_patches") of the pack. v3=False: without importing the V3 API."""
    _package()
    nodes = f"{PACKAGE}.nodes"
    if not v3 and nodes not in sys.modules:
        spec = importlib.util.spec_from_file_location(nodes, REPO / "nodes" / "__init__.py",
                                                      submodule_search_locations=[str(REPO / "nodes")])
        sys.modules[nodes] = importlib.util.module_from_spec(spec)  # registered, __init__ not run
    return importlib.import_module(f"{PACKAGE}.{name}")
