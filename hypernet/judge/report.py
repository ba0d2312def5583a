"""Judgement outputs: JSON (every question and answer), CSV summaries, a self-contained HTML
report, a plain-text report (for the ComfyUI node) and an annotated verdict grid image.

Nothing here sees the API key: results carry `BackendConfig.describe()`, which names only the
variable or file the key comes from.
"""

from __future__ import annotations

import csv
import html
import io
import json
import math
from pathlib import Path
from typing import Sequence

from PIL import Image, ImageDraw, ImageFont

from ..safetensors_io import atomic_write
from .images import PreparedImage, thumbnail_data_uri
from .parsing import NO, YES
from .protocol import CONTENT, STYLE, ImageJob
from .runner import METHOD_KEYS, PAIR_KEYS, JudgeResult

_ASPECTS = (CONTENT, STYLE, "joint")
_COLOURS = {YES: (46, 160, 67), NO: (207, 34, 46)}
_UNSURE_COLOUR = (140, 140, 140)


def percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100.0 * value:.1f}%"


def summary_columns(rows: Sequence[dict], keys: Sequence[str]) -> list[str]:
    columns = list(keys) + ["images"]
    for aspect in _ASPECTS:
        columns += [f"{aspect}_{part}" for part in ("accuracy", "yes", "no", "unparseable")]
    if rows and f"{CONTENT}_score" in rows[0]:
        columns += [f"{aspect}_score" for aspect in _ASPECTS]
    return columns


def _side_text(side: dict) -> str:
    if "score" in side:
        score = "?" if side["score"] is None else f"{side['score']:.0f}"
        return f"{side['verdict']} ({score})"
    votes = f"{side['yes']}/{side['yes'] + side['no']}"
    extra = f", {side['unparseable']} unparseable" if side["unparseable"] else ""
    return f"{side['verdict']} ({votes} yes{extra}{', tie' if side['tie'] else ''})"


def _short_side(side: dict) -> str:
    """Fits under a 256 px grid cell: "yes 3/4 (+1 unparseable)" or "no 35"."""
    if "score" in side:
        return f"{side['verdict']} {'?' if side['score'] is None else round(side['score'])}"
    extra = f" (+{side['unparseable']} unparseable)" if side["unparseable"] else ""
    return f"{side['verdict']} {side['yes']}/{side['yes'] + side['no']}{extra}"


def text_report(result: JudgeResult) -> str:
    """Short human-readable report (the judge node's STRING output)."""
    backend = result.settings["backend"]
    lines = [f"LoRA.rar MLLM judge — {backend['protocol']} {backend['model']}, mode {result.settings['mode']}"]
    for row in result.by_pair:
        lines.append(
            f"{row['subject'] or 'subject'} × {row['style'] or 'style'}: content {percent(row['content_accuracy'])}, "
            f"style {percent(row['style_accuracy'])}, joint {percent(row['joint_accuracy'])} "
            f"over {row['images']} image(s); unparseable: content {row['content_unparseable']}, "
            f"style {row['style_unparseable']}"
        )
    for record in result.records:
        checks = record["checks"]
        lines.append(
            f"  {record['image']}: {record['joint'].upper()} — content {_side_text(checks[CONTENT])}, "
            f"style {_side_text(checks[STYLE])}"
        )
    lines.append(f"{result.questions} question(s), {result.asked} asked now, rest from cache")
    return "\n".join(lines)


def _write_atomic(path: Path, data: bytes) -> None:
    atomic_write(path, lambda tmp: tmp.write_bytes(data), force=True)  # reports are rewritten each run


def _csv_bytes(rows: Sequence[dict], columns: Sequence[str]) -> bytes:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue().encode("utf-8")


def answer_rows(records: Sequence[dict]) -> list[dict]:
    rows = []
    for record in records:
        for check in (CONTENT, STYLE):
            for vote in record["checks"][check]["votes"]:
                rows.append({**{k: record[k] for k in PAIR_KEYS}, "image": record["image"],
                             "check": check, "reference": vote["reference"],
                             "answer": vote["answer"], "parsed": vote["parsed"],
                             "score": vote.get("score")})
    return rows


def write_outputs(result: JudgeResult, jobs: Sequence[ImageJob], out_dir: Path) -> dict[str, Path]:
    """judgement.json, summary_by_pair.csv, summary_by_method.csv, answers.csv, report.html."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {
        "json": out_dir / "judgement.json",
        "by_pair": out_dir / "summary_by_pair.csv",
        "by_method": out_dir / "summary_by_method.csv",
        "answers": out_dir / "answers.csv",
        "html": out_dir / "report.html",
    }
    payload = json.dumps(result.to_json(), indent=2, ensure_ascii=False)
    _write_atomic(files["json"], payload.encode("utf-8"))
    _write_atomic(files["by_pair"], _csv_bytes(result.by_pair, summary_columns(result.by_pair, PAIR_KEYS)))
    _write_atomic(files["by_method"], _csv_bytes(result.by_method, summary_columns(result.by_method, METHOD_KEYS)))
    answer_columns = list(PAIR_KEYS) + ["image", "check", "reference", "answer", "parsed", "score"]
    _write_atomic(files["answers"], _csv_bytes(answer_rows(result.records), answer_columns))
    _write_atomic(files["html"], html_report(result, jobs).encode("utf-8"))
    return files


_CSS = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{border:1px solid #ccc;padding:.25em .6em;text-align:right}
td:first-child,th:first-child{text-align:left}.grid{display:flex;flex-wrap:wrap;gap:.6em}
figure{margin:0;width:200px;font-size:12px}figure img{max-width:192px;max-height:192px;border:4px solid #999}
.yes img{border-color:#2ea043}.no img{border-color:#cf222e}.refs img{border-color:#ddd}
details{font-size:12px;margin-top:.3em}pre{white-space:pre-wrap;margin:.2em 0}
"""


def _table(rows: Sequence[dict], keys: Sequence[str]) -> str:
    columns = summary_columns(rows, keys)
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = []
    for row in rows:
        cells = []
        for column in columns:
            value = row.get(column)
            if column.endswith("_accuracy"):
                value = percent(value)
            elif column.endswith("_score"):
                value = "n/a" if value is None else f"{value:.1f}"
            cells.append(f"<td>{html.escape(str(value))}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def _figure(image: PreparedImage, caption: str, css_class: str, details: str = "") -> str:
    return (f'<figure class="{css_class}"><img src="{thumbnail_data_uri(image.image)}" '
            f'alt="{html.escape(image.label)}"><figcaption>{caption}</figcaption>{details}</figure>')


def html_report(result: JudgeResult, jobs: Sequence[ImageJob]) -> str:
    """A single HTML file with inline thumbnails, the accuracy tables and every answer."""
    settings = result.settings
    backend = settings["backend"]
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>LoRA.rar MLLM judge</title>",
        f"<style>{_CSS}</style></head><body><h1>LoRA.rar MLLM judge</h1>",
        f"<p>{html.escape(backend['protocol'])} · {html.escape(backend['url'])} · model "
        f"<b>{html.escape(backend['model'])}</b> · mode {html.escape(settings['mode'])} · "
        f"{result.questions} questions ({result.asked} asked in this run)</p>",
        "<h2>By method</h2>", _table(result.by_method, METHOD_KEYS),
        "<h2>By pair</h2>", _table(result.by_pair, PAIR_KEYS),
    ]
    sections: dict[tuple, list[tuple[ImageJob, dict]]] = {}
    for job, record in zip(jobs, result.records):
        sections.setdefault(tuple(record[k] for k in PAIR_KEYS), []).append((job, record))
    for (method, subject, style), members in sections.items():
        first = members[0][0]
        parts.append(f"<h3>{html.escape(method)}: {html.escape(subject)} × {html.escape(style)}</h3>")
        refs = [_figure(r, "subject reference", "refs") for r in first.subject_refs]
        refs.append(_figure(first.style_ref, "style reference", "refs"))
        parts.append('<div class="grid">' + "".join(refs) + "</div><div class='grid'>")
        for job, record in members:
            checks = record["checks"]
            caption = (f"<b>{record['joint'].upper()}</b><br>content {html.escape(_side_text(checks[CONTENT]))}"
                       f"<br>style {html.escape(_side_text(checks[STYLE]))}")
            votes = "".join(
                f"<pre>{check} vs {html.escape(Path(v['reference']).name)}: "
                f"{html.escape(v['answer'])} → {v['parsed']}</pre>"
                for check in (CONTENT, STYLE) for v in checks[check]["votes"]
            )
            details = f"<details><summary>{html.escape(Path(record['image']).name)}</summary>{votes}</details>"
            parts.append(_figure(job.generated, caption, record["joint"], details))
        parts.append("</div>")
    parts.append("</body></html>")
    return "\n".join(parts)


def verdict_grid(images: Sequence[PreparedImage], records: Sequence[dict], cell: int = 256) -> Image.Image:
    """The generated images in a grid, each framed green (correct), red (wrong) or grey
    (unparseable) with its content/style verdicts written underneath."""
    columns = max(1, math.ceil(math.sqrt(len(images))))
    rows = math.ceil(len(images) / columns)
    caption_h, border = 52, 6
    width, height = cell + 2 * border, cell + 2 * border + caption_h
    canvas = Image.new("RGB", (columns * width, rows * height), (24, 24, 24))
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default(size=13)
    for index, (image, record) in enumerate(zip(images, records, strict=True)):
        x, y = (index % columns) * width, (index // columns) * height
        colour = _COLOURS.get(record["joint"], _UNSURE_COLOUR)
        draw.rectangle([x, y, x + width - 1, y + cell + 2 * border - 1], outline=colour, width=border)
        # fit the cell both ways: small previews are enlarged for display only
        scale = cell / max(image.image.size)
        size = (max(1, round(image.image.width * scale)), max(1, round(image.image.height * scale)))
        thumb = image.image.resize(size, Image.Resampling.LANCZOS)
        canvas.paste(thumb, (x + border + (cell - thumb.width) // 2, y + border + (cell - thumb.height) // 2))
        checks = record["checks"]
        text = (f"{record['joint'].upper()}\ncontent: {_short_side(checks[CONTENT])}\n"
                f"style: {_short_side(checks[STYLE])}")
        draw.multiline_text((x + border, y + cell + 2 * border + 1), text, fill=(235, 235, 235),
                            font=font, spacing=1)
    return canvas
