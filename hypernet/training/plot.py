"""Loss curves as a PIL image (no matplotlib dependency): the ZipLoRA node's IMAGE output and
the trainer's loss.png (the objective, and under it what the trainer watches for collapse)."""

from __future__ import annotations

import math

from PIL import Image, ImageDraw

from ..drawing import font, text, text_width

COLOURS = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75))


def plot_curves(series: dict[str, list[tuple[float, float]]], title: str = "", width: int = 640,
                height: int = 360, log_y: bool = False) -> Image.Image:
    """Draw named (x, y) series on one set of axes, with a legend and min/max labels."""
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    label_font = font(11)
    legend = _legend_rows(draw, list(series), width - 80, label_font)
    left, right, top, bottom = 64, width - 16, 28, height - 24 - 16 * len(legend)
    points = [(x, y) for values in series.values() for x, y in values if math.isfinite(y) and (y > 0 or not log_y)]
    if title:
        text(draw, (left, 8), title, label_font, "black")
    if not points:
        text(draw, (left, height // 2), "no data", label_font, "black")
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
    for value in (y0, y1):
        shown = 10 ** value if log_y else value
        text(draw, (4, bottom - (value - y0) / (y1 - y0) * (bottom - top) - 6), f"{shown:.3g}", label_font, "black")
    text(draw, (left, bottom + 6), f"{x0:g}", label_font, "black")
    end = f"{x1:g}"
    text(draw, (right - text_width(draw, end, label_font), bottom + 6), end, label_font, "black")
    colours = {name: COLOURS[index % len(COLOURS)] for index, name in enumerate(series)}
    for name, values in series.items():
        pixels = [to_px(x, y) for x, y in values if math.isfinite(y) and (y > 0 or not log_y)]
        if len(pixels) == 1:
            px, py = pixels[0]
            draw.ellipse((px - 3, py - 3, px + 3, py + 3), fill=colours[name])
        elif pixels:
            draw.line(pixels, fill=colours[name], width=2)
            if len(pixels) <= 40:
                for px, py in pixels:
                    draw.ellipse((px - 2, py - 2, px + 2, py + 2), fill=colours[name])
    for row, names in enumerate(legend):  # legend rows under the axes, as many as the names need
        x, y = left, bottom + 22 + 16 * row
        for name in names:
            draw.line([(x, y + 7), (x + 14, y + 7)], fill=colours[name], width=3)
            text(draw, (x + 18, y), name, label_font, colours[name])
            x += 18 + text_width(draw, name, label_font) + 16
    return image


def _legend_rows(draw: ImageDraw.ImageDraw, names: list[str], room: int, label_font) -> list[list[str]]:
    rows: list[list[str]] = []
    used = room + 1
    for name in names:
        need = 18 + text_width(draw, name, label_font) + 16
        if used + need > room:
            rows.append([])
            used = 0
        rows[-1].append(name)
        used += need
    return rows


def plot_panels(panels: list[tuple[dict[str, list[tuple[float, float]]], str, bool]], width: int = 640,
                height: int = 300) -> Image.Image:
    """Several `plot_curves` panels (series, title, log_y) stacked top to bottom in one image."""
    images = [plot_curves(series, title, width, height, log_y) for series, title, log_y in panels]
    out = Image.new("RGB", (width, height * len(images)), "white")
    for index, image in enumerate(images):
        out.paste(image, (0, height * index))
    return out


def smooth(values: list[float], window: int = 10) -> list[float]:
    """Trailing moving average (the raw per-step loss is dominated by the random timestep)."""
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out
