"""LoRA.rar: merge a subject LoRA and a style LoRA — the library behind the ComfyUI nodes. SDXL with
the paper's hypernetwork; SD1.5/SD2, Flux, SD3.5, Qwen-Image, Z-Image and Wan too (hypernet/families).

    from hypernet import read_lora, resolve_hypernet, save_merged
    from hypernet.merge import merge

    content = read_lora("my_dog.safetensors")
    style = read_lora("watercolor.safetensors")
    net = resolve_hypernet("lorarar-sdxl")                   # a catalog name or a file path
    merged = merge(content, style, net, content_strength=1.0, style_strength=0.9, method="lorarar")
    print(merged.report.summary())
    save_merged(merged, "dog_watercolor.safetensors")        # a kohya LoRA that loads anywhere

The method (reading, the hypernetwork, the merge methods, export) is at the top of this package;
`nodelogic/` is the ComfyUI nodes' logic, `training/` ZipLoRA and hypernetwork training,
`judge/` the MLLM judge, `testbed/` the world with ground truth, `tooling/` and `cli/` the rest.
Names below are imported on first use, so `import hypernet` (and `python -m hypernet --help`)
stays instant.
"""

from __future__ import annotations

import importlib

__version__ = "0.2.0"  # the same as [project] version in pyproject.toml (a test checks)

# public name → module that defines it
_EXPORTS = {
    "LoraRarError": "errors", "LoraFormatError": "errors", "LoraMismatchError": "errors",
    "HypernetError": "errors", "OutputExistsError": "errors",
    "LoraFile": "lora", "LoraLayer": "lora", "read_lora": "lora", "lora_from_state_dict": "lora",
    "HyperNetwork": "model", "HypernetConfig": "model", "load_hypernet": "model", "save_hypernet": "model",
    "resolve_hypernet": "catalog",
    # the function `merge` lives in the submodule of the same name: `from hypernet.merge import merge`
    "METHODS": "merge",
    "MergedLora": "merged", "MergeReport": "merged",
    "save_merged": "writer", "merge_metadata": "writer",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
