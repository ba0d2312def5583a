"""The paper's batch layout on disk → image jobs.

    generated/<method>/<subject>__<style>/*.png      N images per pair and method
    references/subjects/<subject>/*.png             the subject's reference photos (3–6)
    references/styles/<style>.png                   one style image (or a folder holding one)

If `generated` holds pair folders (`<subject>__<style>`) directly, it is one method named after
the folder. Names are matched exactly (case-sensitive), and `__` (two underscores) separates
subject from style, so single underscores inside names are fine (`wolf_plushie__oil_painting`).
"""

from __future__ import annotations

import logging
from pathlib import Path

from ..errors import JudgeInputError
from .images import IMAGE_SUFFIXES, MAX_SIDE, PreparedImage, list_image_files, load_image_file
from .protocol import ImageJob

log = logging.getLogger(__name__)
PAIR_SEPARATOR = "__"


def _subfolders(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def split_pair(folder: Path) -> tuple[str, str]:
    subject, sep, style = folder.name.partition(PAIR_SEPARATOR)
    if not sep or not subject or not style:
        raise JudgeInputError(
            f"generated pair folder {folder}: expected a name <subject>{PAIR_SEPARATOR}<style>, "
            f"found {folder.name!r}"
        )
    return subject, style


def discover_pairs(generated: Path) -> list[tuple[str, Path]]:
    """[(method, pair folder)] for the generated tree (see module docstring)."""
    generated = Path(generated)
    if not generated.is_dir():
        raise JudgeInputError(f"--generated: expected a folder at {generated}, found none")
    children = _subfolders(generated)
    if not children:
        raise JudgeInputError(f"--generated {generated}: expected method or pair folders, found none")
    if all(PAIR_SEPARATOR in c.name for c in children):
        return [(generated.name, c) for c in children]  # one method, pairs directly inside
    pairs = []
    for method_dir in children:
        pair_dirs = _subfolders(method_dir)
        if not pair_dirs:
            raise JudgeInputError(
                f"--generated method folder {method_dir}: expected <subject>{PAIR_SEPARATOR}<style> "
                "folders inside, found none"
            )
        pairs.extend((method_dir.name, p) for p in pair_dirs)
    return pairs


def _style_file(styles: Path, style: str, pair_dir: Path) -> Path:
    found = sorted(p for p in styles.iterdir()
                   if p.is_file() and p.stem == style and p.suffix.lower() in IMAGE_SUFFIXES)
    if (styles / style).is_dir():
        found += list_image_files(styles / style, f"style reference folder for {style!r}")
    if len(found) != 1:
        what = "none" if not found else ", ".join(str(f) for f in found)
        raise JudgeInputError(
            f"style reference for {pair_dir}: expected exactly one image "
            f"{styles / style}.<png|jpg|…> or one image in {styles / style}/, found {what}"
        )
    return found[0]


def load_jobs(
    generated: Path,
    references: Path,
    images_per_pair: int | None = None,
    max_side: int = MAX_SIDE,
) -> list[ImageJob]:
    """Read the whole layout, failing early (before any request) on anything missing."""
    pairs = discover_pairs(generated)
    references = Path(references)
    subjects_dir, styles_dir = references / "subjects", references / "styles"
    for folder, what in ((subjects_dir, "subject"), (styles_dir, "style")):
        if not folder.is_dir():
            raise JudgeInputError(f"--references: expected a folder {folder} ({what} references), found none")
    subject_refs: dict[str, list[PreparedImage]] = {}
    style_refs: dict[str, PreparedImage] = {}
    jobs = []
    for method, pair_dir in pairs:
        subject, style = split_pair(pair_dir)
        if subject not in subject_refs:
            folder = subjects_dir / subject
            if not folder.is_dir():
                raise JudgeInputError(
                    f"subject references for {pair_dir}: expected a folder {folder}, found none"
                )
            files = list_image_files(folder, f"subject references for {subject!r}")
            subject_refs[subject] = [load_image_file(f, max_side) for f in files]
        if style not in style_refs:
            style_refs[style] = load_image_file(_style_file(styles_dir, style, pair_dir), max_side)
        files = list_image_files(pair_dir, f"generated images of {method}/{pair_dir.name}")
        if images_per_pair is not None:
            if len(files) < images_per_pair:
                raise JudgeInputError(
                    f"generated images in {pair_dir}: expected at least {images_per_pair}, "
                    f"found {len(files)}"
                )
            files = files[:images_per_pair]
        for path in files:
            jobs.append(ImageJob(method, subject, style, load_image_file(path, max_side),
                                 subject_refs[subject], style_refs[style]))
    log.info("judge: %d generated image(s) in %d pair folder(s); %d subject(s), %d style(s)",
             len(jobs), len({(j.method, j.subject, j.style) for j in jobs}),
             len(subject_refs), len(style_refs))
    return jobs
