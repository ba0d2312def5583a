"""What training needs from a base model, and the data prepared for it.

`TrainingBase` bundles a UNet with the callables the objective and the data preparation use:
`denoise(x_t, t, cond)`, the noise schedule, and an encoder with
`encode_image(image [1, H, W, 3] in 0..1) -> latent` and
`encode_prompt(text, latent_shape) -> cond` (cond = {"context": …, "y": …}). ComfyUI models
(comfy_adapter.py) and the built-in test model (testmodel.py) both provide one.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from ..errors import TrainingError
from ..lora import LoraFile, read_lora
from .objective import Cond, Denoise

log = logging.getLogger(__name__)

Example = tuple[torch.Tensor, Cond]


@dataclass
class TrainingBase:
    unet: torch.nn.Module
    denoise: Denoise
    schedule: object                  # DiscreteSchedule / ComfyModelSampling
    encoder: object                   # encode_image, encode_prompt
    resolution: int                   # default training image size (pixels)
    family: str                       # "sdxl", "sd15", "test", …
    description: str                  # recorded in the trained hypernetwork's metadata
    device: torch.device
    autocast_dtype: torch.dtype | None = None
    # Raises to stop (ComfyUI's interrupt check); called before every step. Optional.
    check_interrupt: Callable[[], None] | None = None
    # Called after the data is encoded and before the first step: puts the UNet on its device
    # (encoding with CLIP/VAE may have offloaded it). Optional.
    before_training: Callable[[], None] | None = None


def load_image(path: Path, resolution: int) -> torch.Tensor:
    """An image file as ComfyUI's IMAGE layout [1, H, W, 3] float 0..1, centre-cropped to a
    square and resized to `resolution` (subject and style inputs share one noise tensor, so
    every training image must have the same size)."""
    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im).convert("RGB")
            im = ImageOps.fit(im, (resolution, resolution), Image.Resampling.LANCZOS)
            array = np.asarray(im, dtype=np.float32) / 255.0
    except OSError as exc:
        raise TrainingError(f"{path}: cannot read the image ({exc})") from None
    return torch.from_numpy(array.copy())[None]


def fit_image(image: torch.Tensor, resolution: int) -> torch.Tensor:
    """An IMAGE tensor [B, H, W, C] → centre-cropped square resized to `resolution` (bilinear)."""
    b, h, w, c = image.shape
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    square = image[:, top:top + side, left:left + side, :3].permute(0, 3, 1, 2).float()
    if side != resolution:
        square = torch.nn.functional.interpolate(square, size=(resolution, resolution), mode="bilinear",
                                                 antialias=True, align_corners=False)
    return square.permute(0, 2, 3, 1).clamp(0, 1)


def encode_examples(encoder, images: list[torch.Tensor], prompt: str, device) -> list[Example]:
    """Encode each image (IMAGE [1, H, W, 3]) once, paired with the prompt's conditioning."""
    examples = []
    cond = None
    for image in images:
        with torch.no_grad():
            latent = encoder.encode_image(image).float()
            if cond is None:
                cond = encoder.encode_prompt(prompt, tuple(latent.shape))
        examples.append((latent.to(device), {k: v.to(device) for k, v in cond.items()}))
    return examples


class LoraCache:
    """Most-recently-used LoRAs in memory: a data set of rank-64 SDXL LoRAs does not fit in RAM."""

    def __init__(self, size: int = 8):
        self.size = max(1, size)
        self._items: OrderedDict[Path, LoraFile] = OrderedDict()

    def get(self, path: Path) -> LoraFile:
        if path in self._items:
            self._items.move_to_end(path)
            return self._items[path]
        lora = read_lora(path)
        self._items[path] = lora
        while len(self._items) > self.size:
            self._items.popitem(last=False)
        return lora
