"""Pictures of what a merge did, per transformer block in UNet order. Pure PIL + torch, no ComfyUI.

- LoRA.rar: the hypernetwork gives every input column of every `to_q`/`to_out.0` matrix a pair
  (m_c, m_s). An artist cannot read 280 vectors, but "content dominates the middle of the UNet,
  style the decoder" is visible at a glance when the means are drawn per transformer block (SDXL
  has 70), grouped by the 11 Transformer2D blocks they live in (`coefficient_plot`).
- NP-LoRA has no per-column coefficients; what it did is how much of the content update each
  layer lost to the projection, drawn the same way (`projection_plot`).
- K-LoRA: one bar per attention projection, read from top (start of sampling) to bottom (end):
  blue while the layer uses the content LoRA, orange from its switch point on (`switch_plot`).
"""

from __future__ import annotations

import re
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


def _block_layout(draw: ImageDraw.ImageDraw, blocks: list[str], left: float, right: float, top: float,
                  bottom: float, font, minimum: int = 4) -> tuple[list[float], list[tuple[str, list[int]]]]:
    """x of every item (its Transformer2D block given, in order) and the groups of positions.
    Every block gets room for at least `minimum` items, so that the two-deep 640-wide blocks
    stay readable next to the ten-deep 1280-wide ones; blocks are separated and labelled."""
    groups: list[tuple[str, list[int]]] = []
    for position, block in enumerate(blocks):
        if not groups or groups[-1][0] != block:
            groups.append((block, []))
        groups[-1][1].append(position)
    units = sum(max(len(idx), minimum) for _, idx in groups)
    unit = (right - left) / max(units, 1)
    xs: list[float] = [0.0] * len(blocks)
    cursor = float(left)
    for block, idx in groups:
        span = max(len(idx), minimum) * unit
        for k, position in enumerate(idx):
            xs[position] = cursor + span * (k + 0.5) / len(idx)
        if cursor > left:
            draw.line([(cursor, top), (cursor, bottom)], fill=(190, 190, 190), width=1)
        label = short_block_label(block)
        draw.text((cursor + span / 2 - _text_width(draw, label, font) / 2, bottom + 8), label,
                  fill=INK, font=font)
        cursor += span
    draw.rectangle([left, top, right, bottom], outline=INK, width=1)
    return xs, groups


def _titled_canvas(size: tuple[int, int], title: str, subtitle: str):
    """The frame every plot here shares: background, title, optional subtitle; returns the image,
    its drawing context and the body and small fonts."""
    image = Image.new("RGB", size, BACKGROUND)
    draw = ImageDraw.Draw(image)
    font, small = _font(14), _font(12)
    draw.text((16, 10), title, fill=INK, font=_font(20))
    if subtitle:
        draw.text((16, 38), subtitle, fill=INK, font=small)
    return image, draw, font, small


def coefficient_plot(means: list[BlockMeans], title: str, subtitle: str = "",
                     size: tuple[int, int] = (1024, 512)) -> Image.Image:
    """Line chart of mean m_c (blue) and m_s (orange) per transformer block, grouped and labelled
    by Transformer2D block. With no blocks (method "sum") the picture says so instead."""
    width, height = size
    image, draw, font, small = _titled_canvas(size, title, subtitle)
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

    xs, groups = _block_layout(draw, [m.block for m in means], left, right, top, bottom, font)

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


@dataclass
class BlockValue:
    block: str
    index: int
    value: float      # mean over the block's layers


def block_values(values: dict[str, float]) -> list[BlockValue]:
    """Mean of a per-layer number per transformer block, UNet order (other layers left out)."""
    sums: dict[tuple[str, int], list[float]] = {}
    for name, value in values.items():
        where = _transformer_block(name)
        if where is not None:
            acc = sums.setdefault(where, [0.0, 0])
            acc[0] += float(value)
            acc[1] += 1
    order = sorted(sums, key=lambda k: (naming.unet_block_order_key(k[0]), k[1]))
    return [BlockValue(b, i, sums[(b, i)][0] / sums[(b, i)][1]) for b, i in order]


def projection_plot(values: list[BlockValue], title: str, subtitle: str = "",
                    size: tuple[int, int] = (1024, 512)) -> Image.Image:
    """NP-LoRA: the mean share of the content update the projection removed, per transformer block."""
    width, height = size
    image, draw, font, small = _titled_canvas(size, title, subtitle)
    if not values:
        draw.text((16, height // 2), "No UNet transformer layer is in both LoRAs: nothing was projected.",
                  fill=INK, font=font)
        return image
    left, right, top, bottom = 70, width - 20, 70, height - 70
    high = max(0.1, *(v.value for v in values)) * 1.1

    def y_of(value: float) -> float:
        return bottom - value / high * (bottom - top)

    for tick in _nice_ticks(0.0, high):
        y = y_of(tick)
        draw.line([(left, y), (right, y)], fill=GRID, width=1)
        label = f"{tick:.0%}" if high > 0.05 else f"{tick:g}"
        draw.text((left - 8 - _text_width(draw, label, small), y - 7), label, fill=INK, font=small)
    xs, groups = _block_layout(draw, [v.block for v in values], left, right, top, bottom, font)
    points = [(xs[i], y_of(v.value)) for i, v in enumerate(values)]
    for _block, idx in groups:
        if len(idx) > 1:
            draw.line([points[i] for i in idx], fill=CONTENT_COLOUR, width=2)
    for x, y in points:
        draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=CONTENT_COLOUR)
    legend_y = height - 30
    draw.rectangle([left, legend_y + 3, left + 14, legend_y + 15], fill=CONTENT_COLOUR)
    draw.text((left + 20, legend_y), "share of the content update projected away (mean per transformer block; "
              "0 = untouched, 100% = removed)", fill=INK, font=font)
    return image


@dataclass
class LayerSwitch:
    block: str
    name: str
    point: float      # p at which the layer switches from the content LoRA to the style LoRA


def layer_switches(points: dict[str, float]) -> list[LayerSwitch]:
    """Switch points of the UNet transformer layers in UNet order (within a transformer block:
    attn1 q, k, v, out, then attn2)."""
    projections = ("to_q", "to_k", "to_v", "to_out.0")

    def key(name: str):
        block, index = _transformer_block(name)
        match = re.search(r"\.(attn[12])\.(.+)$", name)
        attention, projection = match.groups() if match else ("", name)
        rank = projections.index(projection) if projection in projections else len(projections)
        return (naming.unet_block_order_key(block), index, attention, rank, name)

    names = sorted((n for n in points if _transformer_block(n) is not None), key=key)
    return [LayerSwitch(_transformer_block(n)[0], n, points[n]) for n in names]


def switch_plot(switches: list[LayerSwitch], title: str, subtitle: str = "",
                size: tuple[int, int] = (1024, 512)) -> Image.Image:
    """K-LoRA: one bar per attention projection, sampling progress from top (p = 0) to bottom
    (p = 1): content-coloured until the layer's switch point, style-coloured after it."""
    width, height = size
    image, draw, font, small = _titled_canvas(size, title, subtitle)
    if not switches:
        draw.text((16, height // 2), "No attention projection is in both LoRAs: every layer is summed.",
                  fill=INK, font=font)
        return image
    left, right, top, bottom = 90, width - 20, 70, height - 70

    def y_of(p: float) -> float:
        return top + min(max(p, 0.0), 1.0) * (bottom - top)

    # room for at least 40 bars per Transformer2D block: the 16 projections of a 640-wide block
    # stay visible (and labelled) next to the 80 of a 1280-wide one
    xs, _ = _block_layout(draw, [s.block for s in switches], left, right, top, bottom, font, minimum=40)
    bar = max(1.0, (right - left) / max(len(switches), 1) * 0.8)
    for x, s in zip(xs, switches):
        middle = y_of(s.point)
        if middle > top + 1:
            draw.rectangle([x - bar / 2, top + 1, x + bar / 2, middle], fill=CONTENT_COLOUR)
        if middle < bottom - 1:
            draw.rectangle([x - bar / 2, middle, x + bar / 2, bottom - 1], fill=STYLE_COLOUR)
    for p, text in ((0.0, "start"), (0.25, "p = 0.25"), (0.5, "p = 0.5"), (0.75, "p = 0.75"), (1.0, "end")):
        y = min(max(y_of(p), top + 7), bottom - 7)
        draw.text((left - 8 - _text_width(draw, text, small), y - 7), text, fill=INK, font=small)
    legend_y = height - 30
    for offset, (colour, text) in enumerate(((CONTENT_COLOUR, "content LoRA in use"),
                                             (STYLE_COLOUR, "style LoRA in use (from the layer's switch point)"))):
        x = left + offset * 260
        draw.rectangle([x, legend_y + 3, x + 14, legend_y + 15], fill=colour)
        draw.text((x + 20, legend_y), text, fill=INK, font=font)
    note = "one bar per attention projection; top = start of sampling"
    draw.text((right - _text_width(draw, note, small), legend_y + 2), note, fill=INK, font=small)
    return image


def image_to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL RGB image → ComfyUI IMAGE tensor (1, H, W, 3), float32 in [0, 1]."""
    data = torch.frombuffer(bytearray(image.convert("RGB").tobytes()), dtype=torch.uint8)
    return data.reshape(1, image.height, image.width, 3).float() / 255.0
