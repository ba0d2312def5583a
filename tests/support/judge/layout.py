"""Build the batch CLI's folder layout with synthetic, colour-coded images.

A generated image is split: left half = subject colour, right half = style colour (see
server.colour_judge). Reference photos are plain colours with slight shading so that they are
not byte-identical.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image

SUBJECT_COLOURS = {"dog": (200, 40, 40), "cat": (40, 200, 40), "wolf_plushie": (220, 220, 40)}
STYLE_COLOURS = {"watercolor": (40, 40, 200), "oil_painting": (200, 40, 200)}
WRONG = (128, 128, 128)  # matches neither a subject nor a style


def split_image(left, right, size=(96, 64), serial: int = 0) -> Image.Image:
    image = Image.new("RGB", size, left)
    image.paste(Image.new("RGB", (size[0] // 2, size[1]), right), (size[0] // 2, 0))
    # A corner pixel that differs per image: identical images would share cached answers.
    image.putpixel((0, 0), (serial % 256, serial // 256 % 256, 7))
    return image


def make_layout(root: Path, methods: dict, subject_refs: int = 3, images: int = 4) -> tuple[Path, Path]:
    """methods: {method: {(subject, style): [(subject_ok, style_ok), …] or None}}; None means
    every image correct. Returns (generated, references)."""
    generated, references = root / "generated", root / "references"
    used_subjects, used_styles = set(), set()
    serial = 0
    for method, pairs in methods.items():
        for (subject, style), spec in pairs.items():
            used_subjects.add(subject)
            used_styles.add(style)
            folder = generated / method / f"{subject}__{style}"
            folder.mkdir(parents=True)
            for index, (subject_ok, style_ok) in enumerate(spec or [(True, True)] * images):
                left = SUBJECT_COLOURS[subject] if subject_ok else WRONG
                right = STYLE_COLOURS[style] if style_ok else WRONG
                serial += 1
                split_image(left, right, serial=serial).save(folder / f"{index:03d}.png")
    for subject in used_subjects:
        folder = references / "subjects" / subject
        folder.mkdir(parents=True)
        for index in range(subject_refs):
            shade = tuple(min(255, c + index) for c in SUBJECT_COLOURS[subject])
            Image.new("RGB", (80, 80), shade).save(folder / f"ref{index}.jpg", quality=95)
    (references / "styles").mkdir(parents=True)
    for style in used_styles:
        Image.new("RGB", (700, 600), STYLE_COLOURS[style]).save(references / "styles" / f"{style}.png")
    return generated, references
