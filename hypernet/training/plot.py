"""Loss curves as a PIL image (no matplotlib dependency): the ZipLoRA node's IMAGE output and
the trainer's loss.png."""

from __future__ import annotations

import math

from PIL import Image, ImageDraw

COLOURS = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75))


def plot_curves(series: dict[str, list[tuple[float, float]]], title: str = "", width: int = 640,
                height: int = 360, log_y: bool = False) -> Image.Image:
    """Draw named (x, y) series on one set of axes, with a legend and min/max labels."""
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    left, right, top, bottom = 64, width - 16, 28, height - 36
    points = [(x, y) for values in series.values() for x, y in values if math.isfinite(y)]
    if title:
        draw.text((left, 8), title, fill="black")
    if not points:
        draw.text((left, height // 2), "no data", fill="black")
        return image

    def ty(y: float) -> float:
        return math.log10(max(y, 1e-12)) if log_y else y

    xs, ys = [p[0] for p in points], [ty(p[1]) for p in points]
    x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    y0, y1 = min(ys), max(ys)
    if y1 - y0 < 1e-12:
        y0, y1 = y0 - 0.5, y1 + 0.5

    def to_px(x: float, y: float) -> tuple[float, float]:
        return (left + (x - x0) / (x1 - x0) * (right - left), bottom - (ty(y) - y0) / (y1 - y0) * (bottom - top))

    draw.rectangle((left, top, right, bottom), outline=(160, 160, 160))
    for value, label in ((y0, y0), (y1, y1)):
        shown = 10 ** label if log_y else label
        draw.text((4, bottom - (value - y0) / (y1 - y0) * (bottom - top) - 6), f"{shown:.3g}", fill="black")
    draw.text((left, bottom + 8), f"{x0:g}", fill="black")
    draw.text((right - 40, bottom + 8), f"{x1:g}", fill="black")
    for index, (name, values) in enumerate(series.items()):
        colour = COLOURS[index % len(COLOURS)]
        pixels = [to_px(x, y) for x, y in values if math.isfinite(y)]
        if len(pixels) == 1:
            px, py = pixels[0]
            draw.ellipse((px - 3, py - 3, px + 3, py + 3), fill=colour)
        elif pixels:
            draw.line(pixels, fill=colour, width=2)
            if len(pixels) <= 40:
                for px, py in pixels:
                    draw.ellipse((px - 2, py - 2, px + 2, py + 2), fill=colour)
        draw.text((left + 8 + 150 * index, bottom + 20), f"— {name}", fill=colour)
    return image


def smooth(values: list[float], window: int = 10) -> list[float]:
    """Trailing moving average (the raw per-step loss is dominated by the random timestep)."""
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out
