"""The decoy suite of gate 1: pictures a judge must never call "the subject".

Each kind imitates a world subject X in some way a weak generator (or a weak judge) confuses
with X. A decoy derived from X counts as a false "subject" when the judges name X; the kinds that
imitate no particular subject (noise, the style image's own object) count when they name any
world subject. Every decoy is drawn in plain style or in one of the world's styles, at a random
pose, deterministically from its seed.
"""

from __future__ import annotations

import numpy as np
import torch

from . import world as W
from .judges import blur

KINDS = ("colour blob", "disc in body colour", "subject without its marking", "another marking",
         "marking on another class", "other body colour", "blend of two subjects", "style image's object",
         "noise", "heavy blur")
IMITATES_ANY = ("style image's object", "noise")


def _blob_mask(rng: np.random.Generator) -> np.ndarray:
    """An irregular blob (two to four overlapping ellipses), the size of an object."""
    x, y = W._GRID
    mask = np.zeros_like(x, bool)
    for _ in range(int(rng.integers(2, 5))):
        cx, cy = rng.uniform(-0.3, 0.3, 2)
        a, b = rng.uniform(0.2, 0.5, 2)
        t = rng.uniform(0, np.pi)
        u = (x - cx) * np.cos(t) + (y - cy) * np.sin(t)
        v = -(x - cx) * np.sin(t) + (y - cy) * np.cos(t)
        mask |= (u / a) ** 2 + (v / b) ** 2 < 1
    return mask


def _blur_images(images: np.ndarray, sigma: float) -> np.ndarray:
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    y = blur(x, torch.full((len(x),), sigma))
    return (y.clamp(0, 1).permute(0, 2, 3, 1).numpy() * 255 + 0.5).astype(np.uint8)


def make_decoys(world: W.World, kind: str, n: int, seed: int = 0) -> tuple[np.ndarray, list[str | None]]:
    """`n` decoys of one kind: (uint8 images, the subject each imitates — None for any)."""
    if kind not in KINDS:
        raise W.TestbedError(f"unknown decoy kind {kind!r}; known: {', '.join(KINDS)}")
    rng = np.random.default_rng(W._seed("decoys", world.seed, kind, seed))
    styles = [W.PLAIN, *world.styles]
    images, imitated = [], []
    for _ in range(n):
        x = world.subjects[int(rng.integers(len(world.subjects)))]
        style = styles[int(rng.integers(len(styles)))]
        pose = W.Pose.random(rng)
        body, mark = W.HUES[x.body], W.MARK_COLOURS[x.mark]
        who: str | None = x.name
        if kind == "colour blob":
            img = W.render_parts(x.cls, x.marking, body, body, style, pose, body_mask=_blob_mask(rng))
        elif kind == "disc in body colour":
            img = W.render_parts("ball", x.marking, body, body, style, pose)
        elif kind == "subject without its marking":
            img = W.render_parts(x.cls, x.marking, body, body, style, pose)
        elif kind == "another marking":
            other = [m for m in W.MARKINGS if m != x.marking][int(rng.integers(len(W.MARKINGS) - 1))]
            img = W.render_parts(x.cls, other, body, mark, style, pose)
        elif kind == "marking on another class":
            other = [c for c in W.CLASSES if c != x.cls][int(rng.integers(len(W.CLASSES) - 1))]
            img = W.render_parts(other, x.marking, body, mark, style, pose)
        elif kind == "other body colour":
            other = [h for h in W.HUES if h != x.body][int(rng.integers(len(W.HUES) - 1))]
            img = W.render_parts(x.cls, x.marking, W.HUES[other], mark, style, pose)
        elif kind == "blend of two subjects":
            z = [s for s in world.subjects if s.name != x.name][int(rng.integers(len(world.subjects) - 1))]
            a = W.render(x, style, pose).astype(np.float32)
            b = W.render(z, style, W.Pose.random(rng)).astype(np.float32)
            img = (0.5 * a + 0.5 * b + 0.5).astype(np.uint8)
        elif kind == "style image's object":
            name = world.styles[int(rng.integers(len(world.styles)))].name
            obj, _ = world.style_object(name)
            img, who = W.render(obj, world.style(name), pose), None
        elif kind == "noise":
            raw = rng.random((W.SIZE, W.SIZE, 3))
            if rng.random() < 0.5:  # smooth noise: colour patches the size of a marking
                raw = _blur_images((raw * 255).astype(np.uint8)[None], 2.0)[0] / 255.0
                raw = np.clip((raw - raw.mean()) * 4 + 0.5, 0, 1)
            img, who = (raw * 255 + 0.5).astype(np.uint8), None
        else:  # heavy blur: the subject itself, blurred past recognition (σ = 2.5 px)
            img = _blur_images(W.render(x, style, pose)[None], 2.5)[0]
        images.append(img)
        imitated.append(who)
    return np.stack(images), imitated


def false_subject_rate(subjects: list[str], imitated: list[str | None], world: W.World) -> float:
    """Share of decoys named as the subject they imitate (or as any world subject)."""
    names = {s.name for s in world.subjects}
    hits = [(s in names) if who is None else (s == who) for s, who in zip(subjects, imitated)]
    return float(np.mean(hits)) if hits else float("nan")
