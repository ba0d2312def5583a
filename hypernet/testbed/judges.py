"""The testbed's judges: per-attribute verdicts with a "not recognisable" outcome (round 3).

Round 2's judges were one classifier per side trained on clean renders; on anything else they
extrapolated (a disc in a subject's body colour was "the subject" 30% of the time). Here:

1. **Attribute heads.** One CNN reads a 32×32 image and gives, each with its probability, the
   object's class, marking, body colour and mark colour (the colours *before* the style's palette:
   the palettes are invertible tints and a negative), the six style features (palette, texture,
   effect, background, outline, scheme colour) and the object's pose. It is trained on renders of
   the whole attribute space (any class × marking × colour in any style), not on a world's
   subjects, so it is shared by every world (cached like the base model) and names attributes
   rather than memorising identities.
2. **Analysis by synthesis.** The attributes and pose it reads are rendered again by the world's
   own renderer (the pose refined by a small search) and compared with the image, after a light
   blur: the mean absolute difference over the object (subject residual), the worst 5×5 window on
   the object (local residual: a missing or smeared marking is a few pixels across), and the
   image's edge detail on the object relative to the render's (a heavy blur keeps the colours but
   not the edges). An image whose best explanation does not reproduce it — a blob, a blend of two
   subjects, noise, a heavy blur, a marking that is not the one read — is **not recognisable**:
   its subject verdict is refused, whatever the heads say. The thresholds are what held-out renders
   reach under the small perturbations a faithful generator makes (blur up to σ = 1 px, pixel
   noise, slight colour shifts): the 99% quantile of each statistic (1% for the detail) per
   rendering group (texture × effect), stored in the judges' file. With `calibrate_on="base
   samples"` (the default) each group's thresholds are then widened to the 95% quantile (5% for
   the detail) of the base model's own samples of described prompts whose every attribute the
   heads read right (`calibrate_on_samples`: a render-calibrated reject option refused most of what
   a small base draws, ragged edges and all); the judges then depend on the base, and the
   calibration's figures are in `thresholds["calibration"]`.

A world then names what was recognised: the subject whose (class, marking, body, mark) these are
(or `other`), the style whose six features these are (`plain` when none is set, or `other`).
Per-attribute verdicts are kept for reports. The bench counts an image's content right when its
subject verdict is the pair's subject, its style right when its style verdict is the pair's style.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import world as W

log = logging.getLogger(__name__)

OTHER, PLAIN, UNRECOGNISED = "other", W.PLAIN.name, "not recognisable"
SUBJECT_HEADS = {"class": W.CLASSES, "marking": W.MARKINGS, "body": tuple(W.HUES), "mark": tuple(W.MARK_COLOURS)}
STYLE_HEADS = {f: W.CHOICES[f] for f in W.FEATURES}
HEADS = {**SUBJECT_HEADS, **STYLE_HEADS}
POSE = 4   # dx, dy, scale, rotation


class JudgeNet(nn.Module):
    """One conv at full resolution (markings are a few pixels wide), two at 16×16 and two at 8×8,
    then a shared 256-wide layer that every head and the pose regression read."""

    def __init__(self, width: int = 24):
        super().__init__()

        def conv(i, o):
            return [nn.Conv2d(i, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU()]
        self.trunk = nn.Sequential(*conv(3, width), nn.MaxPool2d(2),
                                   *conv(width, 2 * width), *conv(2 * width, 2 * width), nn.MaxPool2d(2),
                                   *conv(2 * width, 4 * width), *conv(4 * width, 4 * width), nn.MaxPool2d(2),
                                   nn.Flatten(), nn.Linear(4 * width * 16, 256), nn.ReLU())
        self.heads = nn.ModuleDict({name: nn.Linear(256, len(values)) for name, values in HEADS.items()})
        self.pose = nn.Linear(256, POSE)

    def forward(self, x: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        h = self.trunk(x)
        return {name: head(h) for name, head in self.heads.items()}, self.pose(h)


def to_input(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1


def blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Gaussian blur of each image (B, C, H, W) with its own sigma (B,) in pixels (0: unchanged)."""
    r = torch.arange(-4, 5, dtype=torch.float32)
    k = torch.exp(-r[None] ** 2 / (2 * sigma.clamp(min=1e-3)[:, None] ** 2))
    k = k / k.sum(1, keepdim=True)
    b, c, h, w = x.shape
    y = x.reshape(1, b * c, h, w)
    kh = k.repeat_interleave(c, 0)[:, None, None, :]
    kv = k.repeat_interleave(c, 0)[:, None, :, None]
    y = F.conv2d(F.pad(y, (4, 4, 0, 0), mode="replicate"), kh, groups=b * c)
    y = F.conv2d(F.pad(y, (0, 0, 4, 4), mode="replicate"), kv, groups=b * c)
    return y.reshape(b, c, h, w)


def perturb(images: np.ndarray, rng: np.random.Generator, max_blur: float = 1.0, max_noise: float = 0.05,
            max_shift: float = 0.04) -> np.ndarray:
    """What a faithful generator may do to a render: blur (σ ≤ `max_blur` px, half the images), pixel
    noise (σ ≤ `max_noise`), a slight colour shift per channel (≤ `max_shift`)."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    n = len(x)
    sigma = torch.from_numpy(rng.uniform(0, max_blur, n) * (rng.random(n) < 0.5)).float()
    blurred = sigma > 0.05
    if blurred.any():
        x[blurred] = blur(x[blurred], sigma[blurred])
    x = x + torch.from_numpy(rng.normal(0, 1, x.shape) * rng.uniform(0, max_noise, (n, 1, 1, 1))).float()
    x = x + torch.from_numpy(rng.uniform(-max_shift, max_shift, (n, 3, 1, 1))).float()
    return (x.clamp(0, 1).permute(0, 2, 3, 1).numpy() * 255 + 0.5).astype(np.uint8)


# ---------------------------------------------------------------------------------------------
# Verdicts

@dataclass
class Verdict:
    """What the judges say about one image."""

    attributes: dict[str, str | None]          # head → value, None when not confident
    confidence: dict[str, float]
    pose: W.Pose
    subject_residual: float
    local_residual: float
    image_residual: float
    detail_ratio: float
    recognisable: bool                          # the subject's best explanation reproduces the image
    subject: str = UNRECOGNISED                 # a world subject, OTHER or UNRECOGNISED
    style: str = UNRECOGNISED                   # a world style, PLAIN, OTHER or UNRECOGNISED

    def subject_attributes(self) -> tuple | None:
        values = tuple(self.attributes[h] for h in SUBJECT_HEADS)
        return None if any(v is None for v in values) else values

    def style_signature(self) -> tuple | None:
        values = tuple(self.attributes[h] for h in STYLE_HEADS)
        return None if any(v is None for v in values) else values

    def to_json(self) -> dict:
        return {"subject": self.subject, "style": self.style, "recognisable": self.recognisable,
                "attributes": self.attributes, "subject_residual": round(self.subject_residual, 4),
                "local_residual": round(self.local_residual, 4), "image_residual": round(self.image_residual, 4),
                "detail_ratio": round(self.detail_ratio, 3)}


def _style_of(attributes: dict[str, str | None]) -> W.Style:
    """The style the heads read (an unread feature counts as its default: for rendering only)."""
    values = {f: attributes[f] or W.CHOICES[f][0] for f in W.FEATURES}
    if not W.shows_scheme(values["background"], values["outline"]):
        values["scheme"] = "none"
    elif values["scheme"] == "none":
        values["scheme"] = "red"   # shown but unread: any colour (the residual will say it is wrong)
    return W.Style("read", **values)


_COMPARE_BLUR = 0.8   # px: both images are compared after this blur (grain and edges do not count)


def residual_group(attrs: dict) -> str:
    """Renders of one group reach similar residuals: texture × effect as the heads read them."""
    return f"{attrs.get('texture') or 'none'}/{attrs.get('effect') or 'none'}"


def _residuals(image: torch.Tensor, candidates: np.ndarray, body: np.ndarray) -> np.ndarray:
    """(K, 3): subject, local and image residual of each candidate render against `image` (already
    blurred). `body` (K, 32, 32): the candidates' object masks, dilated (the edge is part of it).
    Subject: mean absolute difference over the object. Local: the largest mean difference in a
    5×5 window centred on the object — a marking that is missing, moved or smeared is a few
    pixels across and barely moves the mean, but not the worst window. Image: over the picture."""
    c = blur(to_input(candidates) * 0.5 + 0.5, torch.full((len(candidates),), _COMPARE_BLUR))
    diff = (c - image[None]).abs().mean(1, keepdim=True)                   # (K, 1, 32, 32)
    window = F.avg_pool2d(diff, 5, stride=1, padding=2, count_include_pad=False)[:, 0].numpy()
    diff = diff[:, 0].numpy()
    m = body.astype(np.float32)
    subject = (diff * m).sum((1, 2)) / np.maximum(m.sum((1, 2)), 1.0)
    local = np.where(body, window, 0.0).max((1, 2))
    return np.stack([subject, local, diff.mean((1, 2))], 1)


def _detail(image: np.ndarray, mask: np.ndarray) -> float:
    """Mean absolute difference between neighbouring pixels over the object (its edges and markings)."""
    x = image.astype(np.float32) / 255
    gx, gy = np.abs(np.diff(x, axis=1)).mean(-1), np.abs(np.diff(x, axis=0)).mean(-1)
    mx, my = mask[:, 1:], mask[1:, :]
    return float((gx * mx).sum() / max(mx.sum(), 1) + (gy * my).sum() / max(my.sum(), 1))


def _object_mask(cls: str, pose: W.Pose) -> np.ndarray:
    body, _ = W.masks(cls, "dot", pose)
    return W._down(W._dilate(body, 2).astype(np.float32)) > 0.25


@dataclass
class Judges:
    net: JudgeNet
    thresholds: dict = field(default_factory=dict)   # residual and confidence thresholds
    accuracy: dict = field(default_factory=dict)
    min_confidence: float = 0.5

    # -- reading -------------------------------------------------------------------------------

    @torch.no_grad()
    def read(self, images: np.ndarray, batch: int = 256) -> list[tuple[dict, dict, W.Pose]]:
        """The heads' readings: (attributes or None, confidences, pose) per image."""
        self.net.eval()
        out = []
        for s in range(0, len(images), batch):
            logits, pose = self.net(to_input(images[s:s + batch]))
            probs = {h: F.softmax(v, 1) for h, v in logits.items()}
            for i in range(len(pose)):
                attrs, conf = {}, {}
                for h, values in HEADS.items():
                    p, j = probs[h][i].max(0)
                    conf[h] = float(p)
                    attrs[h] = values[int(j)] if float(p) >= self.min_confidence else None
                dx, dy, scale, rot = pose[i].tolist()
                out.append((attrs, conf, W.Pose(dx, dy, float(np.clip(scale, 0.7, 1.3)), rot, 0)))
        return out

    def explain(self, image: np.ndarray, attrs: dict, pose: W.Pose, rounds: int = 2) -> tuple[np.ndarray, W.Pose]:
        """Analysis by synthesis: render what the heads read, refine the pose by a small coordinate
        search on the subject residual; returns the best render's residuals (subject, local, image:
        `_residuals`) with the image's detail relative to it (`_detail` of the image over that of the
        render: a heavy blur keeps the colours but loses the edges), and its pose."""
        cls_, marking = attrs["class"] or W.CLASSES[0], attrs["marking"] or W.MARKINGS[0]
        body = W.HUES[attrs["body"] or "red"]
        mark = W.MARK_COLOURS[attrs["mark"] or "white"]
        style = _style_of(attrs)
        target = blur(to_input(image[None]) * 0.5 + 0.5, torch.full((1,), _COMPARE_BLUR))[0]

        def score(poses):
            renders = np.stack([W.render_parts(cls_, marking, body, mark, style, p) for p in poses])
            masks = np.stack([_object_mask(cls_, p) for p in poses])
            return _residuals(target, renders, masks)
        best = pose
        best_r = score([best])[0]
        steps = {"dx": 0.04, "dy": 0.04, "rotation": 0.1, "scale": 0.05}
        for _ in range(rounds):
            for name, step in steps.items():
                poses = [W.Pose(**{**best.__dict__, name: getattr(best, name) + d}) for d in (-step, step)]
                r = score(poses)
                j = int(np.argmin(r[:, 0]))
                if r[j, 0] < best_r[0]:
                    best, best_r = poses[j], r[j]
            steps = {k: v / 2 for k, v in steps.items()}
        mask = _object_mask(cls_, best)
        render = W.render_parts(cls_, marking, body, mark, style, best)
        detail = _detail(image, mask) / max(_detail(render, mask), 1e-6)
        return np.append(best_r, detail), best

    def thresholds_for(self, attrs: dict) -> tuple[float, float, float]:
        """The largest subject and local residuals and the smallest detail ratio still accepted for
        what the heads read: one set per rendering group (`residual_group`), as a textured or pixelated
        render is matched less closely than a plain one."""
        out = []
        for kind, default in (("subject_residual", np.inf), ("local_residual", np.inf), ("detail_ratio", 0.0)):
            by_group = self.thresholds.get(kind, {})
            out.append(by_group.get(residual_group(attrs), by_group.get("all", default)))
        return out[0], out[1], out[2]

    def judge(self, images: np.ndarray, world: W.World | None = None) -> list[Verdict]:
        """Per-image verdicts; with a world, also its subject and style names."""
        out = []
        for image, (attrs, conf, pose) in zip(images, self.read(images)):
            r, pose = self.explain(image, attrs, pose)
            max_subject, max_local, min_detail = self.thresholds_for(attrs)
            ok = bool(r[0] <= max_subject and r[1] <= max_local and r[3] >= min_detail
                      and all(attrs[h] is not None for h in SUBJECT_HEADS))
            v = Verdict(attrs, conf, pose, float(r[0]), float(r[1]), float(r[2]), float(r[3]), ok)
            if world is not None:
                v.subject, v.style = name_subject(world, v), name_style(world, v)
            out.append(v)
        return out

    def classify(self, images: np.ndarray, world: W.World) -> tuple[list[str], list[str]]:
        """(subject names, style names) of each image in `world` (OTHER / UNRECOGNISED included)."""
        verdicts = self.judge(images, world)
        return [v.subject for v in verdicts], [v.style for v in verdicts]

    # -- files -----------------------------------------------------------------------------------

    def save(self, path: Path) -> Path:
        from safetensors.torch import save_file

        meta = {"format": "lorarar-testbed-judges-v3", "heads": json.dumps(HEADS),
                "thresholds": json.dumps(self.thresholds), "accuracy": json.dumps(self.accuracy),
                "min_confidence": str(self.min_confidence), "width": str(self.net.trunk[0].out_channels),
                "calibrated_on": self.thresholds.get("calibration", {}).get("on", "renders"),
                "calibration_base": self.thresholds.get("calibration", {}).get("base", "")}
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        save_file({k: v.contiguous() for k, v in self.net.state_dict().items()}, str(tmp), meta)
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: Path) -> "Judges":
        from ..safetensors_io import load_safetensors

        tensors, meta = load_safetensors(Path(path))
        if meta.get("format") != "lorarar-testbed-judges-v3":
            raise W.TestbedError(f"{path}: not round-3 testbed judges (format {meta.get('format')!r})")
        if json.loads(meta["heads"]) != {k: list(v) for k, v in HEADS.items()}:
            raise W.TestbedError(f"{path}: judges for another attribute space than this world's")
        net = JudgeNet(int(meta["width"]))
        net.load_state_dict(tensors)
        net.eval()
        return cls(net, json.loads(meta["thresholds"]), json.loads(meta["accuracy"]), float(meta["min_confidence"]))


def name_subject(world: W.World, v: Verdict) -> str:
    if not v.recognisable:
        return UNRECOGNISED
    return world.subject_by_attributes(v.subject_attributes()) or OTHER


def name_style(world: W.World, v: Verdict) -> str:
    signature = v.style_signature()
    if signature is None:
        return UNRECOGNISED
    if not W.shows_scheme(signature[3], signature[4]):
        signature = (*signature[:5], "none")   # an invisible scheme colour is no part of the style
    return world.style_by_signature(signature) or OTHER


# ---------------------------------------------------------------------------------------------
# Training and calibration (world-independent)

def _draw(rng: np.random.Generator, n: int) -> tuple[np.ndarray, dict[str, np.ndarray], np.ndarray]:
    """Renders of the whole attribute space with their labels and poses."""
    items = [(W.generic_subject(rng), W.generic_style(rng, plain=0.2), W.Pose.random(rng)) for _ in range(n)]
    labels = {h: np.array([values.index(s.attributes[i]) for s, _, _ in items])
              for i, (h, values) in enumerate(SUBJECT_HEADS.items())}
    labels.update({f: np.array([W.CHOICES[f].index(getattr(t, f)) for _, t, _ in items]) for f in W.FEATURES})
    poses = np.stack([p.as_array() for _, _, p in items])
    return W.render_batch(items), labels, poses


@dataclass
class JudgeSettings:
    version: int = 3             # of this module's calibration code (analysis by synthesis): part of the cache key
    steps: int = 2500
    batch: int = 128
    lr: float = 3e-3
    width: int = 24
    seed: int = 0
    calibration_images: int = 2000
    quantile: float = 0.99       # of held-out perturbed renders' residuals: the reject thresholds
    # "renders": the thresholds above only; "base samples": each group's thresholds are also widened
    # to what the base model's own samples reach when the heads read every attribute right
    # (`calibrate_on_samples`): the judges then depend on the base (its file is part of the cache key)
    calibrate_on: str = "base samples"
    sample_prompts: int = 300    # described prompts of seen compositions (never gate 2's, never sks/sty tokens)
    sample_per_prompt: int = 2
    sample_steps: int = 20       # DDIM steps, as the gates sample
    sample_quantile: float = 0.95   # of right-read samples' residuals (1 - it for the detail ratio)
    sample_min_group: int = 20   # fewer right-read samples in a rendering group: its render thresholds stay

    def net_key(self) -> dict:
        """What the CNN alone depends on (a new calibration reuses a trained CNN)."""
        return {"render": W.RENDER_VERSION, **{k: getattr(self, k) for k in ("steps", "batch", "lr", "width", "seed")}}


def train_net(settings: JudgeSettings, progress=None) -> JudgeNet:
    """The attribute CNN, trained on renders of the whole attribute space (slightly perturbed)."""
    s = settings
    rng = np.random.default_rng(W._seed("judges3", s.seed))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(s.seed)
        net = JudgeNet(s.width)
    opt = torch.optim.AdamW(net.parameters(), lr=s.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=s.lr, total_steps=s.steps, pct_start=0.1)
    net.train()
    for step in range(s.steps):
        images, labels, poses = _draw(rng, s.batch)
        logits, pose = net(to_input(perturb(images, rng, max_blur=1.2, max_noise=0.06, max_shift=0.05)))
        loss = sum(F.cross_entropy(logits[h], torch.from_numpy(labels[h])) for h in HEADS)
        loss = loss + 10 * F.mse_loss(pose, torch.from_numpy(poses))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if progress and (step + 1) % 100 == 0:
            progress(step + 1, s.steps, float(loss.detach()))
    return net.eval()


def train_judges(settings: JudgeSettings, progress=None, net: JudgeNet | None = None) -> Judges:
    """Train the CNN (or take `net`, one trained with the same training settings) and calibrate
    the analysis by synthesis's thresholds."""
    s = settings
    start = time.perf_counter()
    if net is None:
        net = train_net(s, progress)
    judges = Judges(net.eval())
    # the reject threshold: held-out renders (another random stream) under the generator's perturbations
    cal = np.random.default_rng(W._seed("judges3-calibration", s.seed))
    images, labels, _ = _draw(cal, s.calibration_images)
    verdicts = judges.judge(perturb(images, cal))
    groups: dict[str, list[tuple[float, float, float]]] = {}
    for v in verdicts:
        for g in (residual_group(v.attributes), "all"):
            groups.setdefault(g, []).append((v.subject_residual, v.local_residual, v.detail_ratio))
    kept = {g: np.array(r) for g, r in sorted(groups.items()) if len(r) >= 50}
    judges.thresholds = {
        "subject_residual": {g: float(np.quantile(r[:, 0], s.quantile)) for g, r in kept.items()},
        "local_residual": {g: float(np.quantile(r[:, 1], s.quantile)) for g, r in kept.items()},
        "detail_ratio": {g: float(np.quantile(r[:, 2], 1 - s.quantile)) for g, r in kept.items()},
        "calibration_counts": {g: len(r) for g, r in sorted(groups.items())},
        "quantile": s.quantile, "calibration_images": s.calibration_images,
        "perturbation": {"max_blur_px": 1.0, "max_noise": 0.05, "max_colour_shift": 0.04}}
    judges.accuracy = {"train_steps": s.steps, "batch": s.batch,
                       "seconds": round(time.perf_counter() - start, 1)}   # this call: training (if any) and calibration
    log.info("judges calibrated on %d perturbed renders (%.0f s): thresholds %s", s.calibration_images,
             time.perf_counter() - start, {k: {g: round(t, 3) for g, t in judges.thresholds[k].items()}
                                           for k in ("subject_residual", "local_residual", "detail_ratio")})
    return judges


CALIBRATION_ON = ("renders", "base samples")


def calibration_items(settings: JudgeSettings, avoid_prompts: set[str] = frozenset()) -> list[tuple[W.Subject, W.Style]]:
    """The prompts the reject option is calibrated on: full descriptions ("a red ball with white dot
    in warm hatched style") of random objects of seen compositions in random styles, from a stream of
    their own; never a prompt in `avoid_prompts` (gate 2's), never a world's sks/sty token."""
    rng = np.random.default_rng(W._seed("judges3-sample-calibration", settings.seed))
    unseen = W.held_out_compositions()
    items: list[tuple[W.Subject, W.Style]] = []
    while len(items) < settings.sample_prompts:
        subject, style = W.generic_subject(rng, unseen), W.generic_style(rng)
        if W.describe_prompt(subject, style) not in avoid_prompts:
            items.append((subject, style))
    return items


def calibrate_on_samples(judges: Judges, model, settings: JudgeSettings, avoid_prompts: set[str] = frozenset(),
                         base_name: str = "") -> dict:
    """Widen the reject thresholds to the base's own drawing: sample `model` for `calibration_items`,
    judge the samples, keep those whose every attribute (subject and style heads) the heads read as
    the prompt says, and per rendering group with at least `sample_min_group` of them take the
    `sample_quantile` of their subject and local residuals (1 - it of the detail ratio). Each group's
    threshold becomes the looser of the render-calibrated one and this; the calibration's figures
    go into `judges.thresholds["calibration"]`. Deterministic (own prompt stream, fixed noise)."""
    s = settings
    items = calibration_items(s, avoid_prompts)
    prompts = [W.describe_prompt(a, b) for a, b in items for _ in range(s.sample_per_prompt)]
    noise = torch.randn((len(prompts), 12, W.SIZE // 2, W.SIZE // 2),
                        generator=torch.Generator().manual_seed(W._seed("judges3-sample-noise", s.seed) % 2 ** 63))
    images = model.sample(prompts, noise, s.sample_steps)
    truths = [{**dict(zip(SUBJECT_HEADS, a.attributes)), **{f: getattr(b, f) for f in W.FEATURES}}
              for a, b in items for _ in range(s.sample_per_prompt)]
    verdicts = judges.judge(images)
    groups: dict[str, list[tuple[float, float, float]]] = {}
    right = 0
    for v, t in zip(verdicts, truths):
        if all(v.attributes[h] == t[h] for h in HEADS):
            right += 1
            for g in (residual_group(v.attributes), "all"):
                groups.setdefault(g, []).append((v.subject_residual, v.local_residual, v.detail_ratio))
    kept = {g: np.array(r) for g, r in sorted(groups.items()) if len(r) >= s.sample_min_group}
    q = s.sample_quantile
    from_samples = {
        "subject_residual": {g: float(np.quantile(r[:, 0], q)) for g, r in kept.items()},
        "local_residual": {g: float(np.quantile(r[:, 1], q)) for g, r in kept.items()},
        "detail_ratio": {g: float(np.quantile(r[:, 2], 1 - q)) for g, r in kept.items()}}
    from_renders = {k: dict(judges.thresholds[k]) for k in from_samples}
    for kind, by_group in from_samples.items():
        loosest = min if kind == "detail_ratio" else max
        for g, t in by_group.items():
            judges.thresholds[kind][g] = loosest(judges.thresholds[kind].get(g, t), t)
    judges.thresholds["calibration"] = {
        "on": "base samples", "base": base_name, "prompts": len(items), "per_prompt": s.sample_per_prompt,
        "sampling_steps": s.sample_steps, "quantile": q, "min_group": s.sample_min_group,
        "samples": len(verdicts), "read_right": right,
        "accepted_before": float(np.mean([v.recognisable for v in verdicts])),
        "right_counts": {g: len(r) for g, r in sorted(groups.items())},
        "from_renders": from_renders, "from_samples": from_samples}
    log.info("judges recalibrated on %d base samples (%d read right): subject residual thresholds %s",
             len(verdicts), right, {g: round(t, 3) for g, t in judges.thresholds["subject_residual"].items()})
    return judges.thresholds["calibration"]
