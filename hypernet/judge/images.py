"""Images as the judge sees them: downscaled to ≤512 px, RGB, hashed, PNG-encoded once.

The hash is over the downscaled RGB pixels (plus size), not over encoded bytes, so the answer
cache stays valid across Pillow versions whose PNG encoder output differs.
"""

from __future__ import annotations

import base64
import hashlib
import io
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..errors import JudgeInputError

MAX_SIDE = 512  # docs/judge.md: the paper downscales to ≤512 px before asking the judge
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


@dataclass(frozen=True)
class PreparedImage:
    """One image, ready to send. `label` says where it came from (file or input[index])."""

    label: str
    image: Image.Image = field(repr=False, compare=False)
    sha256: str

    @cached_property
    def png_base64(self) -> str:
        # Encoded once: a reference photo is sent with every generated image of its pair.
        buffer = io.BytesIO()
        self.image.save(buffer, format="PNG")
        return base64.b64encode(buffer.getvalue()).decode("ascii")

    def data_uri(self) -> str:
        return "data:image/png;base64," + self.png_base64


def prepare(image: Image.Image, label: str, max_side: int = MAX_SIDE) -> PreparedImage:
    """Convert to RGB and shrink so the long side is at most `max_side` (never enlarge)."""
    rgb = image.convert("RGB")
    long_side = max(rgb.size)
    if long_side > max_side:
        scale = max_side / long_side
        size = (max(1, round(rgb.width * scale)), max(1, round(rgb.height * scale)))
        rgb = rgb.resize(size, Image.Resampling.LANCZOS)
    digest = hashlib.sha256(f"{rgb.width}x{rgb.height}:".encode())
    digest.update(rgb.tobytes())
    return PreparedImage(label=label, image=rgb, sha256=digest.hexdigest())


def load_image_file(path: Path, max_side: int = MAX_SIDE) -> PreparedImage:
    path = Path(path)
    try:
        with Image.open(path) as opened:
            opened.load()
            return prepare(opened, str(path), max_side)
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise JudgeInputError(
            f"{path}: expected an image file ({', '.join(IMAGE_SUFFIXES)}), "
            f"but it could not be read as one ({exc.__class__.__name__})"
        ) from exc


def list_image_files(folder: Path, what: str) -> list[Path]:
    """Image files in `folder`, sorted by name. Hidden files are skipped; anything else that is
    not an image is an error rather than silently dropped, so a stray file never shrinks N."""
    folder = Path(folder)
    if not folder.is_dir():
        raise JudgeInputError(f"{what}: expected a folder at {folder}, found none")
    files = []
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith(".") or entry.is_dir():
            continue
        if entry.suffix.lower() not in IMAGE_SUFFIXES:
            raise JudgeInputError(
                f"{what}: {entry} is not an image (expected {', '.join(IMAGE_SUFFIXES)})"
            )
        files.append(entry)
    if not files:
        raise JudgeInputError(f"{what}: no images in {folder}")
    return files


def images_from_array(batch, input_name: str, max_side: int = MAX_SIDE) -> list[PreparedImage]:
    """A ComfyUI IMAGE (tensor or array [B,H,W,C], floats 0..1, C = 3 or 4) → prepared images."""
    if batch is None:
        raise JudgeInputError(f"{input_name}: expected an IMAGE batch, got nothing")
    array = batch.detach().cpu().float().numpy() if hasattr(batch, "detach") else np.asarray(batch)
    shape = list(array.shape)
    if array.ndim == 3:  # one image without its batch axis
        array = array[None]
    if array.ndim != 4 or array.shape[-1] not in (1, 3, 4):
        raise JudgeInputError(
            f"{input_name}: expected an IMAGE of shape [batch, height, width, 3], found shape {shape}"
        )
    if array.shape[0] == 0:
        raise JudgeInputError(f"{input_name}: the image batch is empty")
    pixels = (np.clip(array, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    if pixels.shape[-1] == 1:
        pixels = np.repeat(pixels, 3, axis=-1)
    return [
        prepare(Image.fromarray(frame[..., :3]), f"{input_name}[{index}]", max_side)
        for index, frame in enumerate(pixels)
    ]


def thumbnail_data_uri(image: Image.Image, side: int = 192) -> str:
    """Small JPEG data URI for self-contained HTML reports."""
    thumb = image.copy()
    thumb.thumbnail((side, side), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    thumb.save(buffer, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
