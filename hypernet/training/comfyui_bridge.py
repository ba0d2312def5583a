"""The one place in `hypernet` that imports ComfyUI: loading a base checkpoint for the CLI's
`train`/`ziplora --base CKPT` through the ComfyUI checkout named by COMFYUI_PATH.

Everything else in the library takes ComfyUI objects duck-typed (`comfy_adapter`), so the
library imports and runs without ComfyUI. The imports happen inside the functions, by module
name, only when a checkpoint is actually loaded.
"""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

import torch

from ..errors import TrainingError
from .comfy_adapter import comfy_training_base
from .data import TrainingBase


def import_comfyui():
    """Put COMFYUI_PATH on sys.path and import (comfy.sd, comfy.model_management)."""
    root = os.environ.get("COMFYUI_PATH")
    if not root:
        raise TrainingError("COMFYUI_PATH is not set: point it at a ComfyUI checkout (the folder with "
                            "main.py and comfy/) to load a base checkpoint, or use --base tiny for the "
                            "built-in test model")
    if not (Path(root) / "comfy" / "sd.py").is_file():
        raise TrainingError(f"COMFYUI_PATH={root} is not a ComfyUI checkout (no comfy/sd.py there)")
    if root not in sys.path:
        sys.path.insert(0, root)
    try:
        return importlib.import_module("comfy.sd"), importlib.import_module("comfy.model_management")
    except ImportError as exc:
        raise TrainingError(f"cannot import ComfyUI from {root} ({exc}); run with ComfyUI's Python "
                            "environment") from None


def load_comfy_checkpoint(path: str | Path, resolution: int | None = None) -> tuple[TrainingBase, object]:
    """Load a base checkpoint through ComfyUI → (TrainingBase, ModelPatcher)."""
    comfy_sd, model_management = import_comfyui()
    path = Path(path)
    if not path.is_file():
        raise TrainingError(f"{path}: no such checkpoint")
    with torch.inference_mode(False):
        out = comfy_sd.load_checkpoint_guess_config(str(path), output_vae=True, output_clip=True)
        model, clip, vae = out[:3]
        if model is None or clip is None or vae is None:
            raise TrainingError(f"{path}: ComfyUI found no UNet, text encoder and VAE in this checkpoint")
        base = comfy_training_base(
            model, clip, vae, resolution, description=f"{path.name} via ComfyUI",
            check_interrupt=model_management.throw_exception_if_processing_interrupted,
            load_model=lambda: model_management.load_models_gpu([model], force_full_load=True))
    return base, model
