"""Pictures of what a merge did, per transformer block in UNet order. Pure PIL + torch, no ComfyUI.

- LoRA.rar: the hypernetwork gives every input column of every `to_q`/`to_out.0` matrix a pair
  (m_c, m_s). An artist cannot read 280 vectors, but "content dominates the middle of the UNet,
  style the decoder" is visible at a glance when the means are drawn per transformer block (SDXL
  has 70), grouped by the 11 Transformer2D blocks they live in (`coefficient_plot`). Behind them,
  H(0) — what H gives for a zero input, its fixed recipe — as a light band per block, so a user
  sees whether H reacted to their pair; the area below 0 (the LoRA's update subtracted) is shaded
  and labelled.
- NP-LoRA has no per-column coefficients; what it did is how much of the content update each
  layer lost to the projection, drawn the same way (`projection_plot`).
- K-LoRA: one bar per attention projection, read from top (start of sampling) to bottom (end):
  blue while the layer uses the content LoRA, orange from its switch point on (`switch_plot`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from PIL import Image, ImageDraw

from .. import naming
from ..drawing import font as _font
from ..drawing import text as _text
from ..drawing import text_width as _text_width
from ..drawing import vertical_text
from ..methods.lorarar_diagnostics import block_label

CONTENT_COLOUR = (31, 119, 180)
STYLE_COLOUR = (255, 127, 14)
CONTENT_REFERENCE = (176, 208, 235)   # H(0) marks: the series' colours, lightened
STYLE_REFERENCE = (255, 206, 160)
BACKGROUND = (255, 255, 255)
INK = (30, 30, 30)
GRID = (225, 225, 225)
NEGATIVE_AREA = (253, 238, 238)


@dataclass
class BlockMeans:
    block: str        # Transformer2D block, e.g. "input_blocks.4.1"
    index: int        # transformer_blocks.<index> inside it
    content: float    # mean m_c over its merged matrices and columns
    style: float
    reference: tuple[float, float] | None = None   # H(0) = (m_c, m_s) for a zero input at this width


def _transformer_block(name: str) -> tuple[str, int] | None:
    block = naming.transformer_block_of(name)
    if block is None:
        return None
    rest = name[len(block) + 1:]
    if not naming.is_unet_block(block):
        return block, 0  # a DiT block is one transformer block
    if not rest.startswith("transformer_blocks."):
        return None
    return block, int(rest.split(".")[1])


def block_means(coefficients: dict[str, tuple[torch.Tensor, torch.Tensor]],
                references: dict[str, tuple[float, float]] | None = None) -> list[BlockMeans]:
    """Mean (m_c, m_s) per transformer block (all columns of all its merged matrices), UNet order;
    `references`: H(0) per Transformer2D block, carried along for the plot's marks."""
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
    references = references or {}
    return [BlockMeans(b, i, sums[(b, i)][0] / sums[(b, i)][2], sums[(b, i)][1] / sums[(b, i)][2], references.get(b))
            for b, i in order]


def h0_references(contribution) -> dict[str, tuple[float, float]]:
    """Transformer2D block → H(0) of its width, from a merge's `contribution` (None: no marks)."""
    if contribution is None:
        return {}
    return {b.block: contribution.widths[b.width].h0 for b in contribution.blocks if b.width in contribution.widths}


def short_block_label(block: str) -> str:
    """`input_blocks.4.1` → `in 4`, `middle_block.1` → `mid`, `output_blocks.3.1` → `out 3`."""
    return block_label(block)


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
        _text(draw, (cursor + span / 2 - _text_width(draw, label, font) / 2, bottom + 8), label, font, INK)
        cursor += span
    draw.rectangle([left, top, right, bottom], outline=INK, width=1)
    return xs, groups


def _titled_canvas(size: tuple[int, int], title: str, subtitle: str, caption: str = ""):
    """The frame every plot here shares: background, title, optional subtitle and a caption line
    under it; returns the image, its drawing context and the body and small fonts."""
    image = Image.new("RGB", size, BACKGROUND)
    draw = ImageDraw.Draw(image)
    font, small = _font(14), _font(12)
    _text(draw, (16, 10), title, _font(20), INK)
    if subtitle:
        _text(draw, (16, 38), subtitle, small, INK)
    if caption:
        _text(draw, (16, 55), caption, small, INK)
    return image, draw, font, small


def _dashed(draw: ImageDraw.ImageDraw, x0: float, x1: float, y: float, colour, dash: int = 6, gap: int = 6,
            width: int = 1) -> None:
    x = x0
    while x < x1:
        draw.line([(x, y), (min(x + dash, x1), y)], fill=colour, width=width)
        x += dash + gap


def _legend_box(draw: ImageDraw.ImageDraw, x: float, y: float, colour) -> None:
    draw.rectangle([x, y + 3, x + 14, y + 15], fill=colour)


def coefficient_plot(means: list[BlockMeans], title: str, subtitle: str = "",
                     size: tuple[int, int] = (1024, 512), caption: str = "") -> Image.Image:
    """Line chart of mean m_c (blue) and m_s (orange) per transformer block, grouped and labelled
    by Transformer2D block, with H(0) as a light band per block where known and the area below 0
    (the LoRA's update subtracted) shaded. With no blocks (method "sum") the picture says so."""
    width, height = size
    image, draw, font, small = _titled_canvas(size, title, subtitle, caption)
    if not means:
        message = "No hypernetwork coefficients: every layer is content × strength + style × strength."
        _text(draw, (16, height // 2), message, font, INK)
        return image

    # room: title, subtitle and caption above; the rotated axis title and tick labels on the
    # left; block labels and two legend rows below
    left, right, top, bottom = 84, width - 20, 80, height - 82
    values = [v for m in means for v in (m.content, m.style, *(m.reference or ()))]
    negative = min(values) < 0  # some side subtracted somewhere: shade and explain the area below 0
    low, high = min(0.0, *values), max(1.0, *values)
    pad = 0.05 * (high - low)
    low, high = low - pad, high + pad

    def y_of(value: float) -> float:
        return bottom - (value - low) / (high - low) * (bottom - top)

    zero = y_of(0.0)
    if negative:
        draw.rectangle([left, zero, right, bottom], fill=NEGATIVE_AREA)
    for tick in _nice_ticks(low, high):
        y = y_of(tick)
        draw.line([(left, y), (right, y)], fill=GRID, width=1)
        label = f"{tick:g}"
        _text(draw, (left - 8 - _text_width(draw, label, small), y - 7), label, small, INK)
    for reference in (0.0, 1.0):  # 0 = layer side switched off, 1 = plain sum
        _dashed(draw, left, right, y_of(reference), (150, 150, 150))
    if negative and bottom - zero > 18:
        _text(draw, (left + 6, zero + 3), "below 0: that LoRA's update is subtracted (inverted) on these layers",
              small, (150, 60, 60))
    vertical_text(image, (8, top + (bottom - top) // 2 - 50), "mean coefficient", small, INK)

    xs, groups = _block_layout(draw, [m.block for m in means], left, right, top, bottom, font)

    for _block, idx in groups:  # H(0) marks across each Transformer2D block (one width per block)
        reference = means[idx[0]].reference
        if reference is None:
            continue
        first, last = xs[idx[0]], xs[idx[-1]]
        half = max((last - first) / max(len(idx) - 1, 1), 12.0) / 2
        for colour, value in ((CONTENT_REFERENCE, reference[0]), (STYLE_REFERENCE, reference[1])):
            # a wide light band behind the means: visible where they leave it, under them where not
            draw.line([(first - half, y_of(value)), (last + half, y_of(value))], fill=colour, width=9)

    for colour, pick in ((CONTENT_COLOUR, lambda m: m.content), (STYLE_COLOUR, lambda m: m.style)):
        points = [(xs[i], y_of(pick(m))) for i, m in enumerate(means)]
        for (_block, idx) in groups:  # connect points only inside one Transformer2D block
            segment = [points[i] for i in idx]
            if len(segment) > 1:
                draw.line(segment, fill=colour, width=2)
        for x, y in points:
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)

    legend_y = height - 50
    _legend_box(draw, left, legend_y, CONTENT_COLOUR)
    _text(draw, (left + 20, legend_y), "content m_c (mean per transformer block)", font, INK)
    _legend_box(draw, left + 330, legend_y, STYLE_COLOUR)
    _text(draw, (left + 350, legend_y), "style m_s", font, INK)
    if any(m.reference is not None for m in means):
        x = left + 450
        draw.line([(x, legend_y + 6), (x + 16, legend_y + 6)], fill=CONTENT_REFERENCE, width=6)
        draw.line([(x, legend_y + 13), (x + 16, legend_y + 13)], fill=STYLE_REFERENCE, width=6)
        _text(draw, (x + 22, legend_y), "light bands: H(0), what H gives any input near zero (its fixed recipe)",
              font, INK)
    note = ("grey dashed: 0 = that LoRA switched off, 1 = kept as in a plain sum; below 0 (shaded): "
            "its update is subtracted")
    _text(draw, (left, legend_y + 22), note, small, INK)
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
        _text(draw, (16, height // 2), "No UNet transformer layer is in both LoRAs: nothing was projected.", font, INK)
        return image
    left, right, top, bottom = 70, width - 20, 70, height - 70
    high = max(0.1, *(v.value for v in values)) * 1.1

    def y_of(value: float) -> float:
        return bottom - value / high * (bottom - top)

    for tick in _nice_ticks(0.0, high):
        y = y_of(tick)
        draw.line([(left, y), (right, y)], fill=GRID, width=1)
        label = f"{tick:.0%}" if high > 0.05 else f"{tick:g}"
        _text(draw, (left - 8 - _text_width(draw, label, small), y - 7), label, small, INK)
    xs, groups = _block_layout(draw, [v.block for v in values], left, right, top, bottom, font)
    points = [(xs[i], y_of(v.value)) for i, v in enumerate(values)]
    for _block, idx in groups:
        if len(idx) > 1:
            draw.line([points[i] for i in idx], fill=CONTENT_COLOUR, width=2)
    for x, y in points:
        draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=CONTENT_COLOUR)
    legend_y = height - 30
    draw.rectangle([left, legend_y + 3, left + 14, legend_y + 15], fill=CONTENT_COLOUR)
    _text(draw, (left + 20, legend_y), "share of the content update projected away (mean per transformer block; "
          "0 = untouched, 100% = removed)", font, INK)
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
        _text(draw, (16, height // 2), "No attention projection is in both LoRAs: every layer is summed.", font, INK)
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
        _text(draw, (left - 8 - _text_width(draw, text, small), y - 7), text, small, INK)
    legend_y = height - 30
    for offset, (colour, text) in enumerate(((CONTENT_COLOUR, "content LoRA in use"),
                                             (STYLE_COLOUR, "style LoRA in use (from the layer's switch point)"))):
        x = left + offset * 260
        draw.rectangle([x, legend_y + 3, x + 14, legend_y + 15], fill=colour)
        _text(draw, (x + 20, legend_y), text, font, INK)
    note = "one bar per attention projection; top = start of sampling"
    _text(draw, (right - _text_width(draw, note, small), legend_y + 2), note, small, INK)
    return image


def image_to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL RGB image → ComfyUI IMAGE tensor (1, H, W, 3), float32 in [0, 1]."""
    data = torch.frombuffer(bytearray(image.convert("RGB").tobytes()), dtype=torch.uint8)
    return data.reshape(1, image.height, image.width, 3).float() / 255.0
