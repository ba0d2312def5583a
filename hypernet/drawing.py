"""Text on the pack's PIL pictures (coefficient plots, loss curves) with Pillow's built-in font.

Pillow ≥ 10.1 ships one scalable font (Aileron), and nothing else can be relied on in a ComfyUI
install. It lacks glyphs such as "×", "—", "–", "Δ", "→" and "≈" and draws a box for each (issue 19:
the sum plot's "content × strength"). `text` replaces every character the font lacks by an ASCII
stand-in before drawing, so a picture never shows a box whatever a caller writes.
"""

from __future__ import annotations

from functools import lru_cache

from PIL import Image, ImageDraw, ImageFont

# Stand-ins for glyphs the built-in font lacks; anything else it lacks becomes "?".
FALLBACKS = {"×": "x", "—": "-", "–": "-", "−": "-", "Δ": "d", "→": "->", "←": "<-", "≈": "~", "≤": "<=", "≥": ">=",
             "µ": "u", "…": "...", "‘": "'", "’": "'", "“": '"', "”": '"', "∞": "inf", "√": "sqrt", "₁": "1",
             "₂": "2", "‖": "||"}


@lru_cache(maxsize=8)
def font(size: int = 14) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)  # scalable font, Pillow >= 10.1 with FreeType
    except TypeError:  # older Pillow: fixed bitmap font, still legible
        return ImageFont.load_default()


def _mask(font_, character: str):
    mask = font_.getmask(character)
    return mask.size, bytes(mask)


@lru_cache(maxsize=4096)
def _has_glyph(font_, character: str) -> bool:
    if character.isspace() or ord(character) < 128:
        return True
    # A missing glyph is drawn as the font's "notdef" box: the same mask as a private-use character.
    return _mask(font_, character) != _mask(font_, "\ue000")


def missing_glyphs(text: str, font_) -> set[str]:
    """The characters of `text` that `font_` would draw as a box."""
    return {c for c in text if not _has_glyph(font_, c)}


def drawable(text: str, font_) -> str:
    """`text` with every character `font_` lacks replaced by its stand-in."""
    return "".join(c if _has_glyph(font_, c) else FALLBACKS.get(c, "?") for c in text)


def text(draw: ImageDraw.ImageDraw, xy: tuple[float, float], value: str, font_, fill) -> None:
    draw.text(xy, drawable(value, font_), fill=fill, font=font_)


def text_width(draw: ImageDraw.ImageDraw, value: str, font_) -> int:
    left, _, right, _ = draw.textbbox((0, 0), drawable(value, font_), font=font_)
    return right - left


def vertical_text(image: Image.Image, xy: tuple[int, int], value: str, font_, fill) -> None:
    """`value` turned 90° anticlockwise (read bottom to top), its top-left corner at `xy`:
    an axis title that needs no room above the plot."""
    shown = drawable(value, font_)
    probe = ImageDraw.Draw(image)
    left, top, right, bottom = probe.textbbox((0, 0), shown, font=font_)
    label = Image.new("RGBA", (right - left + 2, bottom - top + 2), (0, 0, 0, 0))
    ImageDraw.Draw(label).text((-left + 1, -top + 1), shown, fill=fill, font=font_)
    rotated = label.rotate(90, expand=True)
    image.paste(rotated, xy, rotated)
