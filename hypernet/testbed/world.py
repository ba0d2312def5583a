"""Procedural subjects and styles, and a renderer for any subject in any style.

A **subject** is a composite object: a shape class (`ball`, `box`, `kite`, `cross`), a body
colour, a marking (stripe, dot, ring, …) in a contrasting colour and proportions. Within a world
no two subjects share (class, marking), so identity survives styles that recolour everything.
A **style** is a rendering: a palette map applied to the whole picture (hue rotation, negative,
grey, duotone, posterise, channel swap — these *conflict* with the subject's identifying
colours), a background treatment, an outline, a texture on the object and an image effect
(pixelation, blur, contrast). Styles in a world differ from each other, and from `plain`, in at
least two of these five features.

`render(subject, style, pose)` is the ground truth for "subject X in style Y": 64×64 masks are
composited and box-filtered to 32×32, then the style's effect is applied. Everything is numpy
and deterministic; a `World` is a pure function of (seed, number of subjects, number of styles).
"""

from __future__ import annotations

import colorsys
import hashlib
import itertools
import json
from dataclasses import asdict, dataclass

import numpy as np

SIZE = 32            # output resolution
_SS = 2              # supersampling for the masks
CLASSES = ("ball", "box", "kite", "cross")
MARKINGS = ("plain", "hstripe", "vstripe", "dot", "ring", "diagonal", "tophalf", "twodots")
PALETTES = ("identity", "hueshift", "negative", "grey", "duotone", "posterise", "swap")
BACKGROUNDS = ("white", "solid", "gradient", "checker", "stripes")
OUTLINES = ("none", "dark", "light", "colour")
TEXTURES = ("none", "grain", "hatch", "dots")
EFFECTS = ("none", "pixelate", "blur", "contrast")
FEATURES = ("palette", "background", "outline", "texture", "effect")
CHOICES = dict(zip(FEATURES, (PALETTES, BACKGROUNDS, OUTLINES, TEXTURES, EFFECTS)))

# Words the base model learns for each style feature (pretraining prompts describe the style).
STYLE_WORDS = {
    "palette": {"identity": "", "hueshift": "hue", "negative": "negative", "grey": "grey", "duotone": "duotone",
                "posterise": "poster", "swap": "swapped"},
    "background": {"white": "", "solid": "solid", "gradient": "gradient", "checker": "checker", "stripes": "striped"},
    "outline": {"none": "", "dark": "inked", "light": "glowing", "colour": "lined"},
    "texture": {"none": "", "grain": "grainy", "hatch": "hatched", "dots": "dotted"},
    "effect": {"none": "", "pixelate": "pixel", "blur": "blurry", "contrast": "vivid"},
}


@dataclass(frozen=True)
class Subject:
    name: str
    cls: str
    marking: str
    body: tuple[float, float, float]
    mark: tuple[float, float, float]
    aspect: float                    # width/height of the object frame


@dataclass(frozen=True)
class Style:
    name: str
    palette: str = "identity"
    background: str = "white"
    outline: str = "none"
    texture: str = "none"
    effect: str = "none"
    colours: tuple[tuple[float, float, float], ...] = ((0.5, 0.5, 0.5), (0.2, 0.2, 0.2), (0.8, 0.8, 0.8))
    amount: float = 0.5              # hue rotation (turns) / swap permutation choice

    @property
    def signature(self) -> tuple[str, ...]:
        return tuple(getattr(self, f) for f in FEATURES)

    def words(self) -> list[str]:
        return [w for f in FEATURES if (w := STYLE_WORDS[f][getattr(self, f)])]

    @property
    def conflicts(self) -> bool:
        """Recolours the subject's identifying colours."""
        return self.palette != "identity"


PLAIN = Style("plain")


@dataclass(frozen=True)
class Pose:
    dx: float = 0.0
    dy: float = 0.0
    scale: float = 1.0
    rotation: float = 0.0            # radians
    seed: int = 0                    # for textures with noise

    @classmethod
    def random(cls, rng: np.random.Generator) -> "Pose":
        return cls(float(rng.uniform(-0.14, 0.14)), float(rng.uniform(-0.14, 0.14)), float(rng.uniform(0.85, 1.1)),
                   float(rng.uniform(-0.35, 0.35)), int(rng.integers(0, 2 ** 31)))


def _seed(*parts) -> int:
    return int.from_bytes(hashlib.sha256(json.dumps(parts).encode()).digest()[:8], "little")


def _hsv(h: float, s: float, v: float) -> tuple[float, float, float]:
    return tuple(round(c, 4) for c in colorsys.hsv_to_rgb(h % 1.0, s, v))


def random_subject(rng: np.random.Generator, name: str, cls: str, marking: str, hue: float) -> Subject:
    body = _hsv(hue, rng.uniform(0.6, 0.9), rng.uniform(0.6, 0.95))
    if rng.random() < 0.5:   # light or dark marking, contrasting with the body
        mark = _hsv(hue + rng.uniform(0.3, 0.7), rng.uniform(0.0, 0.3), rng.uniform(0.9, 1.0))
    else:
        mark = _hsv(hue + rng.uniform(0.3, 0.7), rng.uniform(0.5, 1.0), rng.uniform(0.1, 0.3))
    return Subject(name, cls, marking, body, mark, round(float(rng.uniform(0.75, 1.3)), 3))


def random_style(rng: np.random.Generator, name: str, signature: tuple[str, ...]) -> Style:
    colours = []
    for i in range(3):
        v = (0.15, 0.55, 0.9)[i] + rng.uniform(-0.1, 0.1)
        colours.append(_hsv(rng.random(), rng.uniform(0.3, 0.9), float(np.clip(v, 0.05, 1.0))))
    return Style(name, *signature, colours=tuple(colours), amount=round(float(rng.uniform(0.25, 0.75)), 3))


def _distance(a: tuple, b: tuple) -> int:
    return sum(x != y for x, y in zip(a, b))


@dataclass
class World:
    """`subjects`, `styles` (both deterministic from `seed`), and which are held out."""

    seed: int
    subjects: list[Subject]
    styles: list[Style]
    test_subjects: list[str]
    test_styles: list[str]

    @classmethod
    def create(cls, seed: int = 0, n_subjects: int = 20, n_styles: int = 16, test_subjects: int = 5,
               test_styles: int = 5) -> "World":
        combos = list(itertools.product(CLASSES, MARKINGS))
        if n_subjects > len(combos):
            raise ValueError(f"at most {len(combos)} subjects (class × marking) fit in a world, not {n_subjects}")
        if not (0 < test_subjects < n_subjects and 0 < test_styles < n_styles):
            raise ValueError("hold out at least one and fewer than all subjects and styles")
        rng = np.random.default_rng(_seed("world", seed))
        order = rng.permutation(len(combos))
        hues = (np.arange(n_subjects) / n_subjects + rng.random()) % 1.0
        hues = hues[rng.permutation(n_subjects)]
        subjects = [random_subject(rng, f"sks{i}", *combos[order[i]], float(hues[i])) for i in range(n_subjects)]
        all_signatures = list(itertools.product(*(CHOICES[f] for f in FEATURES)))
        chosen: list[tuple[str, ...]] = []
        for index in rng.permutation(len(all_signatures)):
            sig = all_signatures[index]
            # at least two features away from plain and from every other style, and never more than
            # one "destructive" effect (pixelation/blur) together with a colour-destroying palette
            if _distance(sig, PLAIN.signature) < 2 or any(_distance(sig, c) < 2 for c in chosen):
                continue
            if sig[4] in ("pixelate", "blur") and sig[0] in ("grey", "duotone", "posterise"):
                continue
            if sig[3] != "none" and sig[4] in ("pixelate", "blur"):
                continue  # a texture under a blur is invisible: the style would not be recognisable
            chosen.append(sig)
            if len(chosen) == n_styles:
                break
        if len(chosen) < n_styles:
            raise ValueError(f"could not draw {n_styles} distinct styles")
        styles = [random_style(rng, f"sty{i}", sig) for i, sig in enumerate(chosen)]
        split = np.random.default_rng(_seed("split", seed))
        test_s = sorted(split.choice(n_subjects, test_subjects, replace=False).tolist())
        test_t = sorted(split.choice(n_styles, test_styles, replace=False).tolist())
        return cls(seed, subjects, styles, [subjects[i].name for i in test_s], [styles[i].name for i in test_t])

    # -- lookups ------------------------------------------------------------------------------------

    def subject(self, name: str) -> Subject:
        return next(s for s in self.subjects if s.name == name)

    def style(self, name: str) -> Style:
        if name == PLAIN.name:
            return PLAIN
        return next(s for s in self.styles if s.name == name)

    @property
    def train_subjects(self) -> list[str]:
        return [s.name for s in self.subjects if s.name not in self.test_subjects]

    @property
    def train_styles(self) -> list[str]:
        return [s.name for s in self.styles if s.name not in self.test_styles]

    @property
    def test_pairs(self) -> list[tuple[str, str]]:
        return [(a, b) for a in self.test_subjects for b in self.test_styles]

    @property
    def free_combos(self) -> list[tuple[str, str]]:
        """(class, marking) combinations no subject of this world uses: the judges' "other" subjects."""
        used = {(s.cls, s.marking) for s in self.subjects}
        return [c for c in itertools.product(CLASSES, MARKINGS) if c not in used]

    def subject_prompt(self, name: str) -> str:
        return f"a {name} {self.subject(name).cls}"

    def style_prompt(self, name: str, cls: str) -> str:
        return f"a {cls} in {name} style"

    def pair_prompt(self, subject: str, style: str) -> str:
        return f"a {subject} {self.subject(subject).cls} in {style} style"

    def to_json(self) -> dict:
        return {"seed": self.seed, "subjects": [asdict(s) for s in self.subjects],
                "styles": [asdict(s) for s in self.styles], "test_subjects": self.test_subjects,
                "test_styles": self.test_styles}

    def style_object(self, name: str) -> tuple[Subject, Pose]:
        """The one object shown in a style LoRA's training image (not a world subject)."""
        rng = np.random.default_rng(_seed("style-object", self.seed, name))
        cls, marking = CLASSES[int(rng.integers(len(CLASSES)))], MARKINGS[int(rng.integers(len(MARKINGS)))]
        return random_subject(rng, "object", cls, marking, float(rng.random())), Pose.random(rng)


def generic_subject(rng: np.random.Generator, combos: list[tuple[str, str]] | None = None) -> Subject:
    """A random object (for pretraining and the judges' "other" class)."""
    if combos:
        cls, marking = combos[int(rng.integers(len(combos)))]
    else:
        cls, marking = CLASSES[int(rng.integers(len(CLASSES)))], MARKINGS[int(rng.integers(len(MARKINGS)))]
    return random_subject(rng, "object", cls, marking, float(rng.random()))


def generic_style(rng: np.random.Generator) -> Style:
    """A random style of the whole style space (for pretraining); about a third are plain."""
    if rng.random() < 0.3:
        return PLAIN
    sig = tuple(CHOICES[f][int(rng.integers(len(CHOICES[f])))] for f in FEATURES)
    return random_style(rng, "generic", sig)


def describe_prompt(subject: Subject, style: Style) -> str:
    """The pretraining prompt: class word and the style's feature words."""
    words = style.words()
    return f"a {subject.cls}" + (f" in {' '.join(words)} style" if words else "")


# ---------------------------------------------------------------------------------------------
# Rendering

def _grid(n: int) -> tuple[np.ndarray, np.ndarray]:
    c = (np.arange(n) + 0.5) / n * 2 - 1
    return np.meshgrid(c, c)  # x (columns), y (rows, down)


_GRID = _grid(SIZE * _SS)


def _masks(subject: Subject, pose: Pose) -> tuple[np.ndarray, np.ndarray]:
    x, y = _GRID
    x, y = x - pose.dx, y - pose.dy
    c, s = np.cos(-pose.rotation), np.sin(-pose.rotation)
    u, v = (c * x - s * y) / pose.scale, (s * x + c * y) / pose.scale
    a = subject.aspect ** 0.5
    u, v = u / a, v * a
    r = 0.55
    if subject.cls == "ball":
        body = u ** 2 + v ** 2 < r ** 2
    elif subject.cls == "box":
        body = np.maximum(abs(u), abs(v)) < r * 0.85
    elif subject.cls == "kite":  # triangle, apex up
        top, bottom = -r * 0.95, r * 0.75
        half = (v - top) / (bottom - top) * r * 0.95
        body = (v > top) & (v < bottom) & (abs(u) < half)
    else:  # cross
        arm = r * 0.38
        body = ((abs(u) < arm) & (abs(v) < r)) | ((abs(v) < arm) & (abs(u) < r))
    m = subject.marking
    if m == "plain":
        mark = np.zeros_like(body)
    elif m == "hstripe":
        mark = abs(v) < r * 0.2
    elif m == "vstripe":
        mark = abs(u) < r * 0.2
    elif m == "dot":
        mark = u ** 2 + v ** 2 < (r * 0.32) ** 2
    elif m == "ring":
        rr = np.sqrt(u ** 2 + v ** 2)
        mark = (rr > r * 0.3) & (rr < r * 0.52)
    elif m == "diagonal":
        mark = abs(u - v) < r * 0.25
    elif m == "tophalf":
        mark = v < -r * 0.05
    else:  # twodots
        mark = ((u - r * 0.42) ** 2 + v ** 2 < (r * 0.2) ** 2) | ((u + r * 0.42) ** 2 + v ** 2 < (r * 0.2) ** 2)
    return body, mark & body


def _down(a: np.ndarray) -> np.ndarray:
    """Box-filter the supersampled array to SIZE."""
    n = SIZE
    return a.reshape(n, _SS, n, _SS, *a.shape[2:]).mean(axis=(1, 3))


def _background(style: Style, n: int) -> np.ndarray:
    c = np.array(style.colours, dtype=np.float32)
    x, y = _grid(n)
    kind = style.background
    if kind == "white":
        return np.full((n, n, 3), 0.95, np.float32)
    if kind == "solid":
        return np.broadcast_to(c[1], (n, n, 3)).astype(np.float32)
    if kind == "gradient":
        t = ((y + 1) / 2)[..., None]
        return (c[0] * (1 - t) + c[2] * t).astype(np.float32)
    if kind == "checker":
        period = 8 / SIZE * 2  # 8 output pixels
        on = ((np.floor((x + 1) / period) + np.floor((y + 1) / period)) % 2)[..., None]
        return (c[1] * on + c[2] * (1 - on)).astype(np.float32)
    period = 10 / SIZE * 2
    on = (np.floor((x + y + 2) / period) % 2)[..., None]
    return (c[0] * on + c[2] * (1 - on)).astype(np.float32)


def _dilate(mask: np.ndarray, steps: int) -> np.ndarray:
    out = mask.copy()
    for _ in range(steps):
        grown = out.copy()
        grown[1:] |= out[:-1]
        grown[:-1] |= out[1:]
        grown[:, 1:] |= out[:, :-1]
        grown[:, :-1] |= out[:, 1:]
        out = grown
    return out


def _palette(img: np.ndarray, style: Style) -> np.ndarray:
    p = style.palette
    if p == "identity":
        return img
    if p == "negative":
        return 1.0 - img
    lum = img @ np.array([0.299, 0.587, 0.114], np.float32)
    if p == "grey":
        return np.repeat(lum[..., None], 3, axis=-1)
    if p == "duotone":
        c = np.array(style.colours, np.float32)
        return c[0] * (1 - lum[..., None]) + c[2] * lum[..., None]
    if p == "posterise":
        return np.round(img * 2) / 2
    if p == "swap":
        order = (1, 2, 0) if style.amount < 0.5 else (2, 0, 1)
        return img[..., order]
    # hueshift: rotation about the grey axis in YIQ
    theta = 2 * np.pi * style.amount
    yiq = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]], np.float32)
    rot = np.array([[1, 0, 0], [0, np.cos(theta), -np.sin(theta)], [0, np.sin(theta), np.cos(theta)]], np.float32)
    m = np.linalg.inv(yiq) @ rot @ yiq
    return img @ m.T.astype(np.float32)


def render(subject: Subject, style: Style = PLAIN, pose: Pose = Pose()) -> np.ndarray:
    """uint8 (32, 32, 3): `subject` drawn in `style` at `pose`."""
    n = SIZE * _SS
    body, mark = _masks(subject, pose)
    img = _background(style, n).copy()
    obj = np.where(mark[..., None], np.array(subject.mark, np.float32), np.array(subject.body, np.float32))
    if style.texture != "none":
        x, y = _GRID
        if style.texture == "grain":
            rng = np.random.default_rng(pose.seed)
            noise = rng.normal(0, 0.12, (SIZE, SIZE)).repeat(_SS, 0).repeat(_SS, 1)
            obj = obj + noise[..., None]
        elif style.texture == "hatch":
            on = (np.floor((x - y + 2) / (6 / SIZE * 2)) % 2 == 0)[..., None]
            obj = np.where(on, obj * 0.55, obj)
        else:  # dots
            period = 4 / SIZE * 2
            fx, fy = ((x + 1) / period) % 1 - 0.5, ((y + 1) / period) % 1 - 0.5
            on = (fx ** 2 + fy ** 2 < 0.07)[..., None]
            obj = np.where(on, 1 - (1 - obj) * 0.3, obj)
    img = np.where(body[..., None], obj, img)
    if style.outline != "none":
        ring = _dilate(body, 2) & ~body
        colour = {"dark": (0.05, 0.05, 0.05), "light": (1.0, 1.0, 1.0)}.get(style.outline, style.colours[0])
        img = np.where(ring[..., None], np.array(colour, np.float32), img)
    img = _down(np.clip(img, 0, 1).astype(np.float32))
    img = np.clip(_palette(img, style), 0, 1)
    if style.effect == "pixelate":
        img = img.reshape(SIZE // 2, 2, SIZE // 2, 2, 3).mean(axis=(1, 3)).repeat(2, 0).repeat(2, 1)
    elif style.effect == "blur":
        pad = np.pad(img, ((1, 1), (1, 1), (0, 0)), mode="edge")
        img = sum(pad[i:i + SIZE, j:j + SIZE] for i in range(3) for j in range(3)) / 9
    elif style.effect == "contrast":
        img = np.clip((img - 0.5) * 1.7 + 0.5, 0, 1)
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)


def render_batch(items: list[tuple[Subject, Style, Pose]]) -> np.ndarray:
    return np.stack([render(*item) for item in items])
