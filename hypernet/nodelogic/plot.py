"""Picture of what a merge did: mean merge coefficients per transformer block, in UNet order.

The hypernetwork gives every input column of every `to_q`/`to_out.0` matrix a pair (m_c, m_s).
An artist cannot read 280 vectors, but "content dominates the middle of the UNet, style the
decoder" is visible at a glance when the means are drawn per transformer block (SDXL has 70),
grouped by the 11 Transformer2D blocks they live in. Pure PIL + torch, no ComfyUI.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from PIL import Image, ImageDraw, ImageFont

from .. import naming

CONTENT_COLOUR = (31, 119, 180)
STYLE_COLOUR = (255, 127, 14)
BACKGROUND = (255, 255, 255)
INK = (30, 30, 30)
GRID = (225, 225, 225)


@dataclass
class BlockMeans:
    block: str        # Transformer2D block, e.g. "input_blocks.4.1"
    index: int        # transformer_blocks.<index> inside it
    content: float    # mean m_c over its merged matrices and columns
    style: float


def _transformer_block(name: str) -> tuple[str, int] | None:
    block = naming.transformer_block_of(name)
    if block is None:
        return None
    rest = name[len(block) + 1:]
    if not rest.startswith("transformer_blocks."):
        return None
    return block, int(rest.split(".")[1])


def block_means(coefficients: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> list[BlockMeans]:
    """Mean (m_c, m_s) per transformer block (all columns of all its merged matrices), UNet order."""
    sums: dict[tuple[str, int], list[float]] = {}
    for name, (m_c, m_s) in coefficients.items():
        where = _transformer_block(name)
        if where is None:
            continue
        acc = sums.setdefault(where, [0.0, 0.0, 0])
        acc[0] += float(m_c.float().sum())
        acc[1] += float(m_s.float().sum())
        acc[2] += m_c.numel()
    order = sorted(sums, key=lambda k: (naming.unet_block_order_key(k[0]), k[1]))
    return [BlockMeans(b, i, sums[(b, i)][0] / sums[(b, i)][2], sums[(b, i)][1] / sums[(b, i)][2])
            for b, i in order]


def short_block_label(block: str) -> str:
    """`input_blocks.4.1` → `in 4`, `middle_block.1` → `mid`, `output_blocks.3.1` → `out 3`."""
    kind, index = block.split(".")[:2]
    return {"input_blocks": f"in {index}", "middle_block": "mid", "output_blocks": f"out {index}"}[kind]


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)  # scalable font, Pillow >= 10.1 with FreeType
    except TypeError:  # older Pillow: fixed bitmap font, still legible
        return ImageFont.load_default()


def _text_width(draw: ImageDraw.ImageDraw, text: str, font) -> int:
    left, _, right, _ = draw.textbbox((0, 0), text, font=font)
    return right - left


def _nice_ticks(low: float, high: float, count: int = 6) -> list[float]:
    span = max(high - low, 1e-6)
    raw = span / count
    magnitude = 10 ** torch.floor(torch.log10(torch.tensor(raw))).item()
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    first = step * torch.ceil(torch.tensor(low / step)).item()
    ticks, value = [], first
    while value <= high + 1e-9:
        ticks.append(round(value, 10))
        value += step
    return ticks


def coefficient_plot(means: list[BlockMeans], title: str, subtitle: str = "",
                     size: tuple[int, int] = (1024, 512)) -> Image.Image:
    """Line chart of mean m_c (blue) and m_s (orange) per transformer block, grouped and labelled
    by Transformer2D block. With no blocks (method "sum") the picture says so instead."""
    width, height = size
    image = Image.new("RGB", size, BACKGROUND)
    draw = ImageDraw.Draw(image)
    title_font, font, small = _font(20), _font(14), _font(12)
    draw.text((16, 10), title, fill=INK, font=title_font)
    if subtitle:
        draw.text((16, 38), subtitle, fill=INK, font=small)
    if not means:
        message = "No hypernetwork coefficients: every layer is content × strength + style × strength."
        draw.text((16, height // 2), message, fill=INK, font=font)
        return image

    left, right, top, bottom = 70, width - 20, 70, height - 70
    values = [v for m in means for v in (m.content, m.style)]
    low, high = min(0.0, *values), max(1.0, *values)
    pad = 0.05 * (high - low)
    low, high = low - pad, high + pad

    def y_of(value: float) -> float:
        return bottom - (value - low) / (high - low) * (bottom - top)

    for tick in _nice_ticks(low, high):
        y = y_of(tick)
        draw.line([(left, y), (right, y)], fill=GRID, width=1)
        label = f"{tick:g}"
        draw.text((left - 8 - _text_width(draw, label, small), y - 7), label, fill=INK, font=small)
    for reference in (0.0, 1.0):  # 0 = layer side switched off, 1 = plain sum
        y = y_of(reference)
        dash = 6
        for x in range(left, right, 2 * dash):
            draw.line([(x, y), (min(x + dash, right), y)], fill=(150, 150, 150), width=1)

    # Horizontal layout: every Transformer2D block gets room for at least 4 points so that
    # the two-deep 640-wide blocks stay readable next to the ten-deep 1280-wide ones.
    groups: list[tuple[str, list[int]]] = []
    for position, m in enumerate(means):
        if not groups or groups[-1][0] != m.block:
            groups.append((m.block, []))
        groups[-1][1].append(position)
    units = sum(max(len(idx), 4) for _, idx in groups)
    unit = (right - left) / units
    xs: list[float] = [0.0] * len(means)
    cursor = float(left)
    for block, idx in groups:
        span = max(len(idx), 4) * unit
        for k, position in enumerate(idx):
            xs[position] = cursor + span * (k + 0.5) / len(idx)
        if cursor > left:
            draw.line([(cursor, top), (cursor, bottom)], fill=(190, 190, 190), width=1)
        label = short_block_label(block)
        draw.text((cursor + span / 2 - _text_width(draw, label, font) / 2, bottom + 8), label,
                  fill=INK, font=font)
        cursor += span
    draw.rectangle([left, top, right, bottom], outline=INK, width=1)

    for colour, pick in ((CONTENT_COLOUR, lambda m: m.content), (STYLE_COLOUR, lambda m: m.style)):
        points = [(xs[i], y_of(pick(m))) for i, m in enumerate(means)]
        for (_block, idx) in groups:  # connect points only inside one Transformer2D block
            segment = [points[i] for i in idx]
            if len(segment) > 1:
                draw.line(segment, fill=colour, width=2)
        for x, y in points:
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)

    legend_y = height - 30
    for offset, (colour, text) in enumerate(((CONTENT_COLOUR, "content m_c (mean per transformer block)"),
                                             (STYLE_COLOUR, "style m_s"))):
        x = left + offset * 360
        draw.rectangle([x, legend_y + 3, x + 14, legend_y + 15], fill=colour)
        draw.text((x + 20, legend_y), text, fill=INK, font=font)
    note = "dashed: 0 and 1 (1 = plain sum)"
    draw.text((right - _text_width(draw, note, small), legend_y + 2), note, fill=INK, font=small)
    draw.text((8, top - 22), "mean coefficient", fill=INK, font=small)
    return image


def image_to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL RGB image → ComfyUI IMAGE tensor (1, H, W, 3), float32 in [0, 1]."""
    data = torch.frombuffer(bytearray(image.convert("RGB").tobytes()), dtype=torch.uint8)
    return data.reshape(1, image.height, image.width, 3).float() / 255.0
