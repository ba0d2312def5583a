"""Logic of the labelled-grid node: a batch of images as one picture, each under its label.

Core ComfyUI can batch and stitch images but cannot write text on them, and a comparison of
merge methods is only readable when every image says which method made it. Pure PIL + torch.
"""

from __future__ import annotations

import math
import re

import torch
from PIL import Image, ImageDraw

from ..drawing import font as _font
from ..drawing import text_width as _text_width
from ..errors import LoraRarError

BACKGROUND = (255, 255, 255)
INK = (20, 20, 20)
MAX_IMAGES = 64


def parse_labels(text: str) -> list[str]:
    """One label per line; a single line may instead separate its labels with commas."""
    lines = [line.strip() for line in text.strip().splitlines()]
    if len(lines) == 1:
        lines = [part.strip() for part in lines[0].split(",")]
    return [line for line in lines if line] if any(lines) else []


def grid_shape(count: int, columns: int) -> tuple[int, int]:
    """(rows, columns); columns 0 = as square as possible, wider than tall."""
    if columns <= 0:
        columns = math.ceil(math.sqrt(count))
    columns = min(columns, count)
    return math.ceil(count / columns), columns


def labelled_grid(images: torch.Tensor, labels_text: str, columns: int = 0) -> torch.Tensor:
    """IMAGE batch (B, H, W, C) in [0, 1] and one label per image → IMAGE (1, H', W', 3)."""
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[-1] not in (1, 3, 4):
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise LoraRarError(f"images: expected an IMAGE batch (batch, height, width, channels), got {shape}")
    count = images.shape[0]
    if not 1 <= count <= MAX_IMAGES:
        raise LoraRarError(f"images: expected 1 to {MAX_IMAGES} images, got {count}")
    labels = parse_labels(labels_text)
    if len(labels) != count:
        raise LoraRarError(f"labels: {len(labels)} label(s) for {count} image(s); give one label per image, "
                           "one per line or separated by commas, in the order of the batch")
    if any(re.search(r"[\x00-\x08\x0b-\x1f]", label) for label in labels):
        raise LoraRarError("labels: control characters are not allowed")
    rows, cols = grid_shape(count, columns)
    height, width = images.shape[1], images.shape[2]
    size = max(14, min(64, width // 18))
    font = _font(size)
    band = size + size // 2 + 8
    gap = max(4, width // 100)
    canvas = Image.new("RGB", (cols * width + (cols + 1) * gap, rows * (height + band) + (rows + 1) * gap), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    pixels = (images[..., :3] if images.shape[-1] != 1 else images.expand(-1, -1, -1, 3))
    pixels = (pixels.float().clamp(0, 1) * 255).round().to(torch.uint8).cpu()
    for index, label in enumerate(labels):
        row, col = divmod(index, cols)
        x = gap + col * (width + gap)
        y = gap + row * (height + band + gap)
        while _text_width(draw, label, font) > width and len(label) > 1:
            label = label[:-2] + "…"
        draw.text((x + (width - _text_width(draw, label, font)) / 2, y + (band - size) / 2 - 2), label,
                  fill=INK, font=font)
        canvas.paste(Image.fromarray(pixels[index].numpy(), "RGB"), (x, y + band))
    data = torch.frombuffer(bytearray(canvas.tobytes()), dtype=torch.uint8)
    return data.reshape(1, canvas.height, canvas.width, 3).float() / 255.0
