"""The testbed's judges: a subject classifier and a style classifier, trained on ground truth.

One small CNN trunk with two heads: the **subject head** names the world subject (or `other`,
objects whose class × marking no world subject has) across every style; the **style head**
names the world style (or `plain`) across every subject. Training images are ground-truth
renders of the whole world (every subject in every style, plus `other` objects and the plain
style) at random poses with a little pixel noise; accuracy is reported on renders at poses
never used in training. A generated image is judged correct on the content side when the
subject head names its subject, on the style side when the style head names its style.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import world as W

log = logging.getLogger(__name__)

OTHER, PLAIN = "other", W.PLAIN.name


class JudgeNet(nn.Module):
    def __init__(self, n_subjects: int, n_styles: int, width: int = 24):
        super().__init__()

        def block(i, o):
            return nn.Sequential(nn.Conv2d(i, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU(),
                                 nn.Conv2d(o, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU())
        self.trunk = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                                   nn.MaxPool2d(2), block(width, 2 * width), nn.MaxPool2d(2),
                                   block(2 * width, 4 * width), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.subject_head = nn.Linear(4 * width, n_subjects)
        self.style_head = nn.Linear(4 * width, n_styles)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.trunk(x)
        return self.subject_head(h), self.style_head(h)


def _to_input(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1


@dataclass
class Judges:
    net: JudgeNet
    subject_labels: list[str]
    style_labels: list[str]
    accuracy: dict

    @torch.no_grad()
    def classify(self, images: np.ndarray, batch: int = 512) -> tuple[list[str], list[str]]:
        """uint8 (B, 32, 32, 3) → (subject names, style names)."""
        self.net.eval()
        subjects, styles = [], []
        for s in range(0, len(images), batch):
            a, b = self.net(_to_input(images[s:s + batch]))
            subjects += [self.subject_labels[i] for i in a.argmax(1).tolist()]
            styles += [self.style_labels[i] for i in b.argmax(1).tolist()]
        return subjects, styles

    def save(self, path: Path) -> Path:
        from safetensors.torch import save_file

        meta = {"format": "lorarar-testbed-judges", "subjects": json.dumps(self.subject_labels),
                "styles": json.dumps(self.style_labels), "accuracy": json.dumps(self.accuracy),
                "width": str(self.net.subject_head.in_features // 4)}
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
        if meta.get("format") != "lorarar-testbed-judges":
            raise ValueError(f"{path}: not testbed judges")
        subjects, styles = json.loads(meta["subjects"]), json.loads(meta["styles"])
        net = JudgeNet(len(subjects), len(styles), int(meta["width"]))
        net.load_state_dict(tensors)
        net.eval()
        return cls(net, subjects, styles, json.loads(meta["accuracy"]))


def blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Gaussian blur of each image (B, 3, H, W) with its own sigma (B,) in pixels (0: unchanged)."""
    r = torch.arange(-3, 4, dtype=torch.float32)
    k = torch.exp(-r[None] ** 2 / (2 * sigma.clamp(min=1e-3)[:, None] ** 2))
    k = k / k.sum(1, keepdim=True)
    b, c, h, w = x.shape
    y = x.reshape(1, b * c, h, w)
    kh = k.repeat_interleave(c, 0)[:, None, None, :]
    kv = k.repeat_interleave(c, 0)[:, None, :, None]
    y = F.conv2d(F.pad(y, (3, 3, 0, 0), mode="replicate"), kh, groups=b * c)
    y = F.conv2d(F.pad(y, (0, 0, 3, 3), mode="replicate"), kv, groups=b * c)
    return y.reshape(b, c, h, w)


def _draw(world: W.World, rng: np.random.Generator, n: int, subject_labels: list[str],
          style_labels: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    items, ys, yt = [], [], []
    free = world.free_combos
    for _ in range(n):
        si = int(rng.integers(len(subject_labels)))
        ti = int(rng.integers(len(style_labels)))
        if subject_labels[si] == OTHER:
            subject = W.generic_subject(rng, free)
        else:
            subject = world.subject(subject_labels[si])
        items.append((subject, world.style(style_labels[ti]), W.Pose.random(rng)))
        ys.append(si)
        yt.append(ti)
    return W.render_batch(items), np.array(ys), np.array(yt)


def train_judges(world: W.World, steps: int = 1500, batch: int = 96, lr: float = 3e-3, seed: int = 0,
                 eval_images: int = 3000, width: int = 24, blur_fraction: float = 0.5, progress=None) -> Judges:
    subject_labels = [s.name for s in world.subjects] + ([OTHER] if world.free_combos else [])
    style_labels = [s.name for s in world.styles] + [PLAIN]
    rng = np.random.default_rng(W._seed("judges", world.seed, seed))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = JudgeNet(len(subject_labels), len(style_labels), width)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    gen = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    net.train()
    for step in range(steps):
        images, ys, yt = _draw(world, rng, batch, subject_labels, style_labels)
        x = _to_input(images)
        # The generator's samples are blurrier than the renders: half of every batch is blurred
        # (σ up to 1.5 px) so that the judges look at what survives blur and not at pixel detail.
        sigma = torch.rand(len(x), generator=gen) * 1.5 * (torch.rand(len(x), generator=gen) < blur_fraction)
        x = torch.where(sigma[:, None, None, None] > 0.05, blur(x, sigma), x)
        x = x + torch.randn(x.shape, generator=gen) * 0.06 * torch.rand(len(x), 1, 1, 1, generator=gen)
        a, b = net(x)
        loss = F.cross_entropy(a, torch.from_numpy(ys)) + F.cross_entropy(b, torch.from_numpy(yt))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if progress and (step + 1) % 100 == 0:
            progress(step + 1, steps, float(loss.detach()))
    net.eval()
    judges = Judges(net, subject_labels, style_labels, {})
    # held out: poses from a different random stream
    test_rng = np.random.default_rng(W._seed("judges-heldout", world.seed, seed))
    images, ys, yt = _draw(world, test_rng, eval_images, subject_labels, style_labels)
    ps, pt = judges.classify(images)
    subject_ok = np.array([p == subject_labels[i] for p, i in zip(ps, ys)])
    style_ok = np.array([p == style_labels[i] for p, i in zip(pt, yt)])
    with torch.no_grad():
        blurred = blur(_to_input(images), torch.full((len(images),), 1.0))
        a, b = net(blurred)
    subject_blur = (a.argmax(1).numpy() == ys).mean()
    style_blur = (b.argmax(1).numpy() == yt).mean()
    judges.accuracy = {"subject": float(subject_ok.mean()), "style": float(style_ok.mean()),
                       "subject_blurred_1px": float(subject_blur), "style_blurred_1px": float(style_blur),
                       "held_out_images": eval_images, "train_steps": steps, "batch": batch,
                       "blur_fraction": blur_fraction, "seconds": round(time.perf_counter() - start, 1)}
    log.info("judges: held-out accuracy subject %.4f, style %.4f (blurred 1 px: %.4f, %.4f; %d renders)",
             judges.accuracy["subject"], judges.accuracy["style"], subject_blur, style_blur, eval_images)
    return judges
