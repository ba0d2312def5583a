"""Pictures for the testbed: the benchmark table, a sample grid, the demo's side-by-side strip."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFont


def percent(v, ci=None) -> str:
    """A share as the benchmark's tables print it: '12.3 [4–21]' (95% interval), '–' if none."""
    if v is None:
        return "–"
    text = f"{100 * v:.1f}"
    return text + (f" [{100 * ci[0]:.0f}–{100 * ci[1]:.0f}]" if ci else "")

INK, GRID, BG = (30, 30, 30), (210, 210, 210), (255, 255, 255)


def font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def ascii_text(text: str) -> str:
    """Pillow's built-in font has no dashes or multiplication signs."""
    return str(text).replace("–", "-").replace("×", "x").replace("—", "-")


def _text_w(draw, text, f) -> int:
    box = draw.textbbox((0, 0), text, font=f)
    return box[2] - box[0]


def table_image(report: dict) -> Image.Image:
    """The benchmark's table per style regime (content / style / joint with intervals) and merge time."""
    regimes = [g for g in ("overlap", "disjoint") if g in set(report["regimes"])]
    headers = ["method"] + [f"{g}: {a}" for g in regimes for a in ("content %", "style %", "joint %")] + ["merge s/pair"]
    body = []
    for r in report["rows"]:
        sec = r["merge_seconds"]
        cells = [r["method"] + (" (errors)" if r["errors"] else "")]
        for g in regimes:
            x = r["by_regime"].get(g)
            cells += [percent(x[a], x[f"{a}_ci"]) if x else "-" for a in ("content", "style", "joint")]
        cells.append("–" if sec is None or r["method"] == "oracle" else f"{sec:.3f}")
        body.append(cells)
    f, fb = font(15), font(17)
    probe = ImageDraw.Draw(Image.new("RGB", (10, 10)))
    # headers are drawn in the larger bold font: measure them in it, or they run into each other
    widths = [max([_text_w(probe, ascii_text(headers[c]), fb)] + [_text_w(probe, ascii_text(row[c]), f) for row in body]) + 24
              for c in range(len(headers))]
    row_h = 26
    counts = ", ".join(f"{sum(x == g for x in report['regimes'])} {g}" for g in regimes)
    title = (f"LoRA.rar testbed: {report.get('pairs_kind', 'held-out')} pairs ({counts}) x {report['settings']['images']} images "
             f"(world seed {report['world_seed']}); 95% bootstrap intervals over pairs")
    width = max(sum(widths) + 20, _text_w(probe, title, fb) + 20)
    image = Image.new("RGB", (width, 50 + row_h * (len(body) + 1) + 10), BG)
    draw = ImageDraw.Draw(image)
    draw.text((10, 10), title, fill=INK, font=fb)
    y = 44
    for i, row in enumerate([headers] + body):
        x = 10
        if i % 2 == 0 and i:
            draw.rectangle([10, y, 10 + sum(widths), y + row_h], fill=(245, 245, 248))
        for c, cell in enumerate(row):
            draw.text((x + 6, y + 5), ascii_text(cell), fill=INK, font=fb if i == 0 else f)
            x += widths[c]
        y += row_h
        if i == 0:
            draw.line([10, y, 10 + sum(widths), y], fill=INK)
    return image


def labelled_grid(cells: list[list[np.ndarray]], row_labels: list[str], col_labels: list[str],
                  scale: int = 3, title: str = "") -> Image.Image:
    """cells[r][c]: uint8 (h, w, 3) images, shown enlarged (nearest) with labels."""
    h, w = cells[0][0].shape[:2]
    ch, cw = h * scale, w * scale
    f = font(14)
    probe = ImageDraw.Draw(Image.new("RGB", (10, 10)))
    left = max(_text_w(probe, lab, f) for lab in row_labels) + 16
    top = 28 + (24 if title else 0)
    image = Image.new("RGB", (left + len(col_labels) * (cw + 6) + 6, top + len(row_labels) * (ch + 6) + 6), BG)
    draw = ImageDraw.Draw(image)
    if title:
        draw.text((8, 6), title, fill=INK, font=font(16))
    for c, lab in enumerate(col_labels):
        draw.text((left + c * (cw + 6), top - 22), ascii_text(lab), fill=INK, font=f)
    for r, lab in enumerate(row_labels):
        y = top + r * (ch + 6)
        draw.text((8, y + ch // 2 - 8), lab, fill=INK, font=f)
        for c, cell in enumerate(cells[r]):
            image.paste(Image.fromarray(cell).resize((cw, ch), Image.Resampling.NEAREST), (left + c * (cw + 6), y))
    return image


def sample_grid(samples: dict, rows: list[str], pairs: list[tuple[str, str]], n_show: int = 2,
                indices: list[int] | None = None, regimes: list[str] | None = None) -> Image.Image:
    """Rows: methods; columns: `pairs` (their indices into `samples`' keys: `indices`, default
    0, 1, …), n_show images each."""
    indices = list(range(len(pairs))) if indices is None else indices
    blank = np.full((32, 32, 3), 255, np.uint8)
    cells = []
    for row in rows:
        line = []
        for pi in indices:
            images = samples.get((row, pi))
            for k in range(n_show):
                line.append(images[k] if images is not None and k < len(images) else blank)
        cells.append(line)
    tags = [f" ({g})" for g in regimes] if regimes else [""] * len(pairs)
    cols = [f"{s} x {t}{tag}" if k == 0 else "" for (s, t), tag in zip(pairs, tags) for k in range(n_show)]
    return labelled_grid(cells, list(rows), cols, scale=3, title="samples (same noise in every row)")


def grid_indices(regimes: list[str], per_regime: int) -> list[int]:
    """The pairs samples.png shows: `per_regime` of each style regime, evenly spaced through its
    pairs (pairs come subject by subject, so the first few would all share one subject), in regime
    order."""
    order = list(dict.fromkeys(sorted(regimes, key=lambda g: (g != "overlap", g))))
    shown = []
    for g in order:
        members = [j for j, r in enumerate(regimes) if r == g]
        k = min(per_regime, len(members))
        shown += [members[round(i * (len(members) - 1) / (k - 1))] if k > 1 else members[0] for i in range(k)]
    return shown


def redraw(bench_dir, n_show: int = 2) -> None:
    """table.png and samples.png again from bench.json and generated/ (after a figure change)."""
    import json
    from pathlib import Path

    bench_dir = Path(bench_dir)
    report = json.loads((bench_dir / "bench.json").read_text())
    table_image(report).save(bench_dir / "table.png")
    rows = [r["method"] for r in report["rows"]]
    pairs = [tuple(p) for p in report["pairs"]]
    shown = grid_indices(report["regimes"], report["settings"]["grid_pairs"])
    samples = {}
    for row in rows:
        for pi in shown:
            s, t = pairs[pi]
            files = sorted((bench_dir / "generated" / row.replace(" ", "_") / f"{s}__{t}").glob("*.png"))
            if files:
                samples[(row, pi)] = np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files[:n_show]])
    sample_grid(samples, rows, [pairs[i] for i in shown], n_show, shown,
                [report["regimes"][i] for i in shown]).save(bench_dir / "samples.png")
