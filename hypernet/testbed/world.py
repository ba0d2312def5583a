"""Procedural subjects and styles, and a renderer for any subject in any style (round 3).

Everything in this world is a combination of a few **primitives the base model learns to draw
from words** (DESIGN §15: a DreamBooth LoRA can only bind concepts the base can already draw):

- a **subject** is a shape class (`ball`, `box`, `kite`, `cross`), a bold marking (stripe, dot,
  ring, …), a body colour out of eight named hues and a mark colour (white or black). Within a
  world no two subjects share (class, marking), so identity survives styles that recolour.
- a **style** is a rendering with six features: a palette (`negative`, `warm`, `cool` tint), a
  texture on the object (a grid, hatching, dots), an effect (pixelation), a background (solid,
  gradient, checker, stripes), an outline and one named scheme colour (backgrounds, coloured
  outline). Styles come in two **regimes** (the knob of issue 18, DESIGN §15): *overlap* styles
  touch the subject's pixels (palette, texture, effect; white background, no outline), *disjoint*
  styles touch only the pixels around it (background, outline, scheme colour). Every style differs
  from `plain` in at least two features; disjoint styles differ from each other in at least two,
  overlap styles in at least one (their three features allow no more than eight styles two apart).

`render(subject, style, pose)` is the ground truth for "subject X in style Y": 64×64 masks are
composited and box-filtered to 32×32, then palette and effect are applied. Everything is numpy
and deterministic; a `World` is a pure function of (seed, sizes). The identifying signals are
made large on purpose (the object spans ~60% of the frame, markings cover 20–50% of it):
concepts are learned in order of the pixel change they cause.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
from dataclasses import asdict, dataclass

import numpy as np

from ..errors import LoraRarError


class TestbedError(LoraRarError, ValueError):
    """A testbed setting or file that cannot be used (a world size, a decoy kind, a foreign file)."""


# bumped whenever `render` draws anything differently: cached models trained on renders (the judges'
# CNN; the base through `BaseSettings.version`) must not outlive the pictures they learned
RENDER_VERSION = 3
SIZE = 32            # output resolution
_SS = 2              # supersampling for the masks
CLASSES = ("ball", "box", "kite", "cross")
MARKINGS = ("hstripe", "vstripe", "dot", "ring", "diagonal", "tophalf", "twodots")
HUES = {"red": (0.86, 0.13, 0.13), "orange": (0.96, 0.55, 0.08), "yellow": (0.95, 0.86, 0.12),
        "green": (0.16, 0.66, 0.22), "cyan": (0.1, 0.76, 0.82), "blue": (0.13, 0.27, 0.86),
        "purple": (0.55, 0.16, 0.74), "pink": (0.97, 0.45, 0.72)}
MARK_COLOURS = {"white": (0.97, 0.97, 0.97), "black": (0.07, 0.07, 0.07)}
# the style's scheme colour has its own words, so that "a red ball … in navy style" never asks the
# token encoder to tell a body colour from a background colour by position alone
SCHEME_WORDS = dict(zip(HUES, ("ruby", "amber", "gold", "jade", "teal", "navy", "violet", "rose")))

PALETTES = ("identity", "negative", "warm", "cool")
TEXTURES = ("none", "grid", "hatch", "dots")
EFFECTS = ("none", "pixelate")
BACKGROUNDS = ("white", "solid", "gradient", "checker", "stripes")
OUTLINES = ("none", "dark", "colour")
SCHEMES = ("none", *HUES)
FEATURES = ("palette", "texture", "effect", "background", "outline", "scheme")
CHOICES = dict(zip(FEATURES, (PALETTES, TEXTURES, EFFECTS, BACKGROUNDS, OUTLINES, SCHEMES)))
OVERLAP_FEATURES = ("palette", "texture", "effect")      # change the subject's own pixels
DISJOINT_FEATURES = ("background", "outline", "scheme")  # change only the pixels around it
REGIMES = ("overlap", "disjoint")

STYLE_WORDS = {
    "palette": {"identity": "", "negative": "negative", "warm": "warm", "cool": "cool"},
    "texture": {"none": "", "grid": "gridded", "hatch": "hatched", "dots": "dotted"},
    "effect": {"none": "", "pixelate": "pixel"},
    "background": {"white": "", "solid": "solid", "gradient": "gradient", "checker": "checker", "stripes": "striped"},
    "outline": {"none": "", "dark": "inked", "colour": "lined"},
    "scheme": {"none": "", **SCHEME_WORDS},
}
_TINT = {"warm": (1.0, 0.8, 0.52), "cool": (0.52, 0.8, 1.0)}


@dataclass(frozen=True)
class Subject:
    name: str
    cls: str
    marking: str
    body: str                        # a HUES name
    mark: str                        # a MARK_COLOURS name

    @property
    def attributes(self) -> tuple[str, str, str, str]:
        return (self.cls, self.marking, self.body, self.mark)


@dataclass(frozen=True)
class Style:
    name: str
    palette: str = "identity"
    texture: str = "none"
    effect: str = "none"
    background: str = "white"
    outline: str = "none"
    scheme: str = "none"             # a HUES name, or "none" when nothing shows it

    @property
    def signature(self) -> tuple[str, ...]:
        return tuple(getattr(self, f) for f in FEATURES)

    def words(self) -> list[str]:
        return [w for f in FEATURES if (w := STYLE_WORDS[f][getattr(self, f)])]

    @property
    def regime(self) -> str:
        """"overlap" when it changes the subject's pixels, "disjoint" when only those around it."""
        return "overlap" if any(getattr(self, f) != CHOICES[f][0] for f in OVERLAP_FEATURES) else "disjoint"

    @property
    def conflicts(self) -> bool:
        """Recolours the subject's identifying colours."""
        return self.palette != "identity"


PLAIN = Style("plain")


def shows_scheme(background: str, outline: str) -> bool:
    """Whether a style with these features shows its scheme colour at all (every background but
    white, and the coloured outline)."""
    return background != "white" or outline == "colour"


@dataclass(frozen=True)
class Pose:
    dx: float = 0.0
    dy: float = 0.0
    scale: float = 1.0
    rotation: float = 0.0            # radians
    # read by nothing since render v3 (no texture is random any more); `random` still draws it, so
    # the poses after it in a stream, and every world's cached training images, stay as they were
    seed: int = 0

    @classmethod
    def random(cls, rng: np.random.Generator) -> "Pose":
        return cls(float(rng.uniform(-0.1, 0.1)), float(rng.uniform(-0.1, 0.1)), float(rng.uniform(0.9, 1.1)),
                   float(rng.uniform(-0.3, 0.3)), int(rng.integers(0, 2 ** 31)))

    def as_array(self) -> np.ndarray:
        return np.array([self.dx, self.dy, self.scale, self.rotation], np.float32)


def _seed(*parts) -> int:
    return int.from_bytes(hashlib.sha256(json.dumps(parts).encode()).digest()[:8], "little")


def _distance(a: tuple, b: tuple) -> int:
    return sum(x != y for x, y in zip(a, b))


def held_out_compositions() -> set[tuple[str, str, str]]:
    """(class, marking, body colour) triples the base never sees in pretraining (one in eight, fixed
    for every world): gate 2 reports the base's samples for these separately. World subjects never
    use them, so a subject LoRA only ever binds a composition the base has drawn."""
    return {c for c in itertools.product(CLASSES, MARKINGS, HUES) if _seed("unseen", *c) % 8 == 0}


def _style_signatures(regime: str) -> list[tuple[str, ...]]:
    out = []
    for sig in itertools.product(*(CHOICES[f] for f in FEATURES)):
        st = Style("x", *sig)
        visible = shows_scheme(st.background, st.outline)
        if (st.scheme != "none") != visible:
            continue  # a scheme colour exactly when something shows it
        if regime == "overlap" and (st.regime != "overlap" or st.background != "white" or st.outline != "none"):
            continue
        if regime == "disjoint" and st.regime != "disjoint":
            continue
        out.append(sig)
    return out


@dataclass
class World:
    """`subjects`, `styles` (both deterministic from `seed`), and which are held out."""

    seed: int
    subjects: list[Subject]
    styles: list[Style]
    test_subjects: list[str]
    test_styles: list[str]

    @classmethod
    def create(cls, seed: int = 0, n_subjects: int = 20, n_styles: int = 24, test_subjects: int = 5,
               test_styles: int = 10) -> "World":
        """Half the styles (and half the held-out ones) of each regime."""
        unseen = held_out_compositions()
        if n_subjects > len(CLASSES) * len(MARKINGS):
            raise TestbedError(f"at most {len(CLASSES) * len(MARKINGS)} subjects (class × marking) fit in a world, "
                             f"not {n_subjects}")
        if not (0 < test_subjects < n_subjects and 0 < test_styles < n_styles):
            raise TestbedError("hold out at least one and fewer than all subjects and styles")
        if n_styles % 2 or test_styles % 2:
            raise TestbedError(f"styles and held-out styles come in equal halves per regime; {n_styles} and "
                             f"{test_styles} must both be even")
        rng = np.random.default_rng(_seed("world3", seed))
        combos = list(itertools.product(CLASSES, MARKINGS))
        order = rng.permutation(len(combos))
        subjects = []
        hues = [list(HUES)[j] for j in rng.permutation(len(HUES))]
        for i in range(n_subjects):
            cls_, marking = combos[order[i]]
            # body colours cycle through the hues (each used equally often); a colour that would make
            # a composition the base never saw moves on to the next hue
            body = next(hues[(i + k) % len(hues)] for k in range(len(hues))
                        if (cls_, marking, hues[(i + k) % len(hues)]) not in unseen)
            mark = ("white", "black")[int(rng.integers(2))]
            subjects.append(Subject(f"sks{i}", cls_, marking, body, mark))
        styles: list[Style] = []
        chosen: list[tuple[str, ...]] = []
        for regime in REGIMES:
            pool = _style_signatures(regime)
            apart = 2 if regime == "disjoint" else 1
            picked = 0
            for index in rng.permutation(len(pool)):
                sig = pool[index]
                if _distance(sig, PLAIN.signature) < 2 or any(_distance(sig, c) < apart for c in chosen):
                    continue
                chosen.append(sig)
                picked += 1
                if picked == n_styles // 2:
                    break
            if picked < n_styles // 2:
                raise TestbedError(f"could not draw {n_styles // 2} distinct {regime} styles")
        order_styles = rng.permutation(len(chosen))  # names do not give the regime away
        styles = [Style(f"sty{i}", *chosen[j]) for i, j in enumerate(order_styles)]
        split = np.random.default_rng(_seed("split3", seed))
        test_s = sorted(split.choice(n_subjects, test_subjects, replace=False).tolist())
        test_t = []
        for regime in REGIMES:
            members = [i for i, s in enumerate(styles) if s.regime == regime]
            test_t += split.choice(members, test_styles // 2, replace=False).tolist()
        return cls(seed, subjects, styles, [subjects[i].name for i in test_s],
                   [styles[i].name for i in sorted(test_t)])

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

    def regime(self, style: str) -> str:
        return self.style(style).regime

    @property
    def free_combos(self) -> list[tuple[str, str]]:
        """(class, marking) combinations no subject of this world uses."""
        used = {(s.cls, s.marking) for s in self.subjects}
        return [c for c in itertools.product(CLASSES, MARKINGS) if c not in used]

    def subject_by_attributes(self, attributes: tuple[str, str, str, str]) -> str | None:
        return next((s.name for s in self.subjects if s.attributes == tuple(attributes)), None)

    def style_by_signature(self, signature: tuple[str, ...]) -> str | None:
        if tuple(signature) == PLAIN.signature:
            return PLAIN.name
        return next((s.name for s in self.styles if s.signature == tuple(signature)), None)

    def subject_prompt(self, name: str) -> str:
        return f"a {name} {self.subject(name).cls}"

    def style_prompt(self, name: str, cls: str) -> str:
        return f"a {cls} in {name} style"

    def pair_prompt(self, subject: str, style: str) -> str:
        return f"a {subject} {self.subject(subject).cls} in {style} style"

    def to_json(self) -> dict:
        return {"seed": self.seed, "subjects": [asdict(s) for s in self.subjects],
                "styles": [{**asdict(s), "regime": s.regime} for s in self.styles],
                "test_subjects": self.test_subjects, "test_styles": self.test_styles}

    def style_object(self, name: str) -> tuple[Subject, Pose]:
        """The one object shown in a style LoRA's training image: never a world subject (its class
        × marking is one no subject has when there is one), so a style LoRA cannot teach a subject."""
        rng = np.random.default_rng(_seed("style-object", self.seed, name))
        free = self.free_combos or list(itertools.product(CLASSES, MARKINGS))
        cls_, marking = free[int(rng.integers(len(free)))]
        return (Subject("object", cls_, marking, list(HUES)[int(rng.integers(len(HUES)))],
                        ("white", "black")[int(rng.integers(2))]), Pose.random(rng))


def generic_subject(rng: np.random.Generator, avoid: set | None = None) -> Subject:
    """A random object of the whole attribute space (pretraining, judges), never a composition in
    `avoid` ((class, marking, body) triples)."""
    while True:
        s = Subject("object", CLASSES[int(rng.integers(len(CLASSES)))], MARKINGS[int(rng.integers(len(MARKINGS)))],
                    list(HUES)[int(rng.integers(len(HUES)))], ("white", "black")[int(rng.integers(2))])
        if not avoid or (s.cls, s.marking, s.body) not in avoid:
            return s


def generic_style(rng: np.random.Generator, plain: float = 0.25) -> Style:
    """A random style of the whole style space; `plain` of them are plain, the rest split between
    the two regimes' kinds and mixtures."""
    if rng.random() < plain:
        return PLAIN
    sig = [CHOICES[f][int(rng.integers(len(CHOICES[f])))] for f in FEATURES]
    kind = rng.random()
    if kind < 0.35:    # overlap only
        sig[3], sig[4] = "white", "none"
    elif kind < 0.7:   # disjoint only
        sig[0], sig[1], sig[2] = "identity", "none", "none"
    if shows_scheme(sig[3], sig[4]):
        if sig[5] == "none":
            sig[5] = list(HUES)[int(rng.integers(len(HUES)))]
    else:
        sig[5] = "none"
    return Style("generic", *sig)


def describe_prompt(subject: Subject, style: Style, keep: np.ndarray | None = None) -> str:
    """The pretraining prompt: "a red ball with white ring in warm hatched style". `keep` (3 bools:
    body colour, marking with its colour, style) drops word groups, so the base also learns what a
    partial description means ("a ball", "a sks3 ball in sty2 style")."""
    k = np.ones(3, bool) if keep is None else keep
    words = ["a"]
    if k[0]:
        words.append(subject.body)
    words.append(subject.cls)
    if k[1]:
        words += ["with", subject.mark, subject.marking]
    style_words = style.words()
    if k[2] and style_words:
        words += ["in", *style_words, "style"]
    return " ".join(words)


# ---------------------------------------------------------------------------------------------
# Rendering

def _grid(n: int) -> tuple[np.ndarray, np.ndarray]:
    c = (np.arange(n) + 0.5) / n * 2 - 1
    return np.meshgrid(c, c)  # x (columns), y (rows, down)


_GRID = _grid(SIZE * _SS)
R = 0.62   # the object's half-size in the unit frame


def masks(cls: str, marking: str, pose: Pose) -> tuple[np.ndarray, np.ndarray]:
    """Supersampled boolean masks (body, marking ⊂ body) of a class with a marking at a pose."""
    x, y = _GRID
    x, y = x - pose.dx, y - pose.dy
    c, s = np.cos(-pose.rotation), np.sin(-pose.rotation)
    u, v = (c * x - s * y) / pose.scale, (s * x + c * y) / pose.scale
    r = R
    if cls == "ball":
        body = u ** 2 + v ** 2 < r ** 2
    elif cls == "box":
        body = np.maximum(abs(u), abs(v)) < r * 0.85
    elif cls == "kite":  # triangle, apex up
        top, bottom = -r * 1.0, r * 0.8
        half = (v - top) / (bottom - top) * r * 1.05
        body = (v > top) & (v < bottom) & (abs(u) < half)
    elif cls == "cross":
        arm = r * 0.45
        body = ((abs(u) < arm) & (abs(v) < r)) | ((abs(v) < arm) & (abs(u) < r))
    else:
        raise TestbedError(f"unknown class {cls!r}")
    if marking == "hstripe":
        mark = abs(v - (0.2 * r if cls == "kite" else 0)) < r * 0.24
    elif marking == "vstripe":
        mark = abs(u) < r * 0.24
    elif marking == "dot":
        mark = u ** 2 + (v - (0.2 * r if cls == "kite" else 0)) ** 2 < (r * 0.36) ** 2
    elif marking == "ring":
        rr = np.sqrt(u ** 2 + (v - (0.25 * r if cls == "kite" else 0)) ** 2)
        mark = (rr > r * 0.3) & (rr < r * 0.6)   # a hole ~6 px across: a ring, never a dot
    elif marking == "diagonal":
        mark = abs(u - v) < r * 0.28
    elif marking == "tophalf":
        mark = v < (0.1 * r if cls == "kite" else -r * 0.05)
    elif marking == "twodots":
        cy = 0.35 * r if cls == "kite" else 0
        d = 0.45 * r if cls != "kite" else 0.4 * r
        mark = ((u - d) ** 2 + (v - cy) ** 2 < (r * 0.24) ** 2) | ((u + d) ** 2 + (v - cy) ** 2 < (r * 0.24) ** 2)
    else:
        raise TestbedError(f"unknown marking {marking!r}")
    return body, mark & body


def _down(a: np.ndarray) -> np.ndarray:
    """Box-filter the supersampled array to SIZE."""
    n = SIZE
    return a.reshape(n, _SS, n, _SS, *a.shape[2:]).mean(axis=(1, 3))


def _pastel(c) -> np.ndarray:
    return 0.5 + 0.5 * np.asarray(c, np.float32)


def _deep(c) -> np.ndarray:
    return 0.55 * np.asarray(c, np.float32)


@functools.lru_cache(maxsize=None)
def _background(kind: str, scheme: str, n: int) -> np.ndarray:
    """The style's background (read-only: cached, since every render of a style draws the same one —
    the renders are a tenth of a pretraining step)."""
    return _read_only(_draw_background(kind, scheme, n))


def _read_only(a: np.ndarray) -> np.ndarray:
    a.setflags(write=False)
    return a


@functools.lru_cache(maxsize=None)
def _texture_mask(texture: str) -> np.ndarray:
    """Where a texture darkens (grid, hatch) or lightens (dots) the object: (n, n, 1) booleans on the
    supersampled frame. Render v3: every texture is a regular pattern fixed to the frame (render v2's
    grain, random 2×2-px noise, was what a weak base draws anyway: gate 2 read texture right on 80%
    of the base's samples, and gate 3's untextured styles were read as grainy whenever the object
    came out speckled). Periods are even, so pixelation keeps the patterns."""
    x, y = _GRID
    if texture == "grid":  # dark lines 2 px wide every 6 px, both directions
        period = 6 / SIZE * 2
        on = (((x + 1) / period) % 1 < 1 / 3) | (((y + 1) / period) % 1 < 1 / 3)
    elif texture == "hatch":  # dark diagonal lines, 3 px of every 6
        on = np.floor((x - y + 2) / (6 / SIZE * 2)) % 2 == 0
    elif texture == "dots":  # light dots, 4 px across, every 6 px
        period = 6 / SIZE * 2
        fx, fy = ((x + 1) / period) % 1 - 0.5, ((y + 1) / period) % 1 - 0.5
        on = fx ** 2 + fy ** 2 < 0.1
    else:
        raise TestbedError(f"unknown texture {texture!r}")
    return _read_only(on[..., None])


def _draw_background(kind: str, scheme: str, n: int) -> np.ndarray:
    if kind == "white":
        return np.full((n, n, 3), 0.96, np.float32)
    c = HUES[scheme]
    light, deep = _pastel(c), _deep(c)
    x, y = _grid(n)
    if kind == "solid":
        return np.broadcast_to(light, (n, n, 3)).astype(np.float32)
    if kind == "gradient":
        t = ((y + 1) / 2)[..., None]
        return (np.full(3, 0.96, np.float32) * (1 - t) + deep * t).astype(np.float32)
    if kind == "checker":
        period = 8 / SIZE * 2  # 8 output pixels
        on = ((np.floor((x + 1) / period) + np.floor((y + 1) / period)) % 2)[..., None]
        return (light * on + 0.96 * (1 - on)).astype(np.float32)
    period = 8 / SIZE * 2
    on = (np.floor((x + y + 2) / period) % 2)[..., None]
    return (deep * on + light * (1 - on)).astype(np.float32)


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


def apply_palette(img: np.ndarray, palette: str) -> np.ndarray:
    if palette == "identity":
        return img
    if palette == "negative":
        return 1.0 - img
    return img * np.array(_TINT[palette], np.float32)


def render(subject: Subject, style: Style = PLAIN, pose: Pose = Pose()) -> np.ndarray:
    """uint8 (32, 32, 3): `subject` drawn in `style` at `pose`."""
    return render_parts(subject.cls, subject.marking, HUES[subject.body], MARK_COLOURS[subject.mark], style, pose)


def render_parts(cls: str, marking: str, body_rgb, mark_rgb, style: Style = PLAIN, pose: Pose = Pose(),
                 body_mask: np.ndarray | None = None) -> np.ndarray:
    """`render` from raw parts (any colours; `body_mask` replaces the class's silhouette, for decoys)."""
    body, mark = masks(cls, marking, pose)
    if body_mask is not None:
        body, mark = body_mask, mark & body_mask
    img = _background(style.background, style.scheme, SIZE * _SS).copy()
    obj = np.where(mark[..., None], np.array(mark_rgb, np.float32), np.array(body_rgb, np.float32))
    if style.texture != "none":
        on = _texture_mask(style.texture)
        if style.texture == "grid":
            obj = np.where(on, obj * 0.45, obj)
        elif style.texture == "hatch":
            obj = np.where(on, obj * 0.5, obj)
        else:
            obj = np.where(on, 1 - (1 - obj) * 0.25, obj)
    img = np.where(body[..., None], obj, img)
    if style.outline != "none":
        ring = _dilate(body, 3) & ~body
        colour = (0.04, 0.04, 0.04) if style.outline == "dark" else _deep(HUES[style.scheme])
        img = np.where(ring[..., None], np.array(colour, np.float32), img)
    img = _down(np.clip(img, 0, 1).astype(np.float32))
    img = np.clip(apply_palette(img, style.palette), 0, 1)
    if style.effect == "pixelate":
        img = img.reshape(SIZE // 2, 2, SIZE // 2, 2, 3).mean(axis=(1, 3)).repeat(2, 0).repeat(2, 1)
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)


def render_batch(items: list[tuple[Subject, Style, Pose]]) -> np.ndarray:
    return np.stack([render(*item) for item in items])
