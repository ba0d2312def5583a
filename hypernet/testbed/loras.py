"""Many small LoRAs trained at once on the testbed base (one batched UNet pass per step).

A testbed world needs ~100 rank-4 LoRAs (subjects, styles, the per-pair references). Trained one
by one at batch 8, each step costs ~100 ms of fixed overhead on a 2-core CPU; stacking K LoRAs
into one batch (each sample sees only its own LoRA: the hook multiplies the k-th slice of the
batch by the k-th LoRA's factors with `bmm`) makes a step cost about what one batch of K·b
samples costs, so 16 LoRAs train in little more than the time of one. The layer set, the factor
layout and the file format are those of `training/lora_trainer.py` (kohya's layer set, `up` zero-
initialised, written by `save_kohya`), so `read_lora`, `inspect` and `merge` read them as usual.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..training.injection import find_module, linear_layer_shapes
from ..training.lora_trainer import Factors
from .base import TestbedBase, diffusion_target, to_latent, uint8_to_image

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoraJob:
    name: str
    images: tuple[np.ndarray, ...]   # uint8 (32, 32, 3) training images
    prompt: str
    seed: int


@dataclass
class StackSettings:
    version: int = 1                 # of this module's training code: part of the LoRAs' cache key
    rank: int = 4
    steps: int = 600
    per_lora_batch: int = 4
    lr: float = 5e-3             # 1e-2 diverged at 900 steps; 5e-3 × 600 lifted gate 3's subjects 79 → 100%
    group: int = 40                  # LoRAs per stacked batch at most; speed only (not in the cache key):
                                     # 40 × 4 images ran at 299 samples/s, 16 × 4 at 229 (2-core CPU)


def train_stacked(model: TestbedBase, jobs: list[LoraJob], settings: StackSettings,
                  progress: Callable[[int, int], None] | None = None) -> list[tuple[Factors, float]]:
    """Train the LoRAs of `jobs` together (one group); returns each job's (factors, final loss).
    Each job's initialisation and draws come from its own seed, so a LoRA does not depend on which
    other LoRAs share its batch."""
    k, b, s = len(jobs), settings.per_lora_batch, settings
    shapes = linear_layer_shapes(model.unet)
    unet = model.unet
    latents = [to_latent(uint8_to_image(np.stack(job.images))) for job in jobs]
    contexts = model.contexts([job.prompt for job in jobs])                      # (K, T, C)
    gens = [torch.Generator().manual_seed(job.seed) for job in jobs]
    params: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for name, (out, inp) in shapes.items():
        down = torch.stack([torch.randn(s.rank, inp, generator=g) / inp ** 0.5 for g in gens]).requires_grad_(True)
        params[name] = (torch.zeros(k, out, s.rank, requires_grad=True), down)

    def hook(module, args, output, up=None, down=None):
        x = args[0]
        rows = x.reshape(k, -1, x.shape[-1])                                     # job-major batch
        delta = torch.bmm(torch.bmm(rows, down.transpose(1, 2)), up.transpose(1, 2))
        return output + delta.reshape(output.shape)

    handles = [find_module(unet, name).register_forward_hook(
        lambda m, a, o, up=up, down=down: hook(m, a, o, up, down)) for name, (up, down) in params.items()]
    opt = torch.optim.Adam([p for pair in params.values() for p in pair], lr=s.lr)
    ac = model.schedule.alphas_cumprod.float()
    context = contexts.repeat_interleave(b, 0)
    losses = np.zeros((s.steps, k))
    start = time.perf_counter()
    try:
        with torch.enable_grad():
            for step in range(s.steps):
                x0, t, noise = [], [], []
                for lat, g in zip(latents, gens):
                    x0.append(lat[torch.randint(len(lat), (b,), generator=g)])
                    t.append(torch.randint(0, len(ac), (b,), generator=g))
                    noise.append(torch.randn((b, *lat.shape[1:]), generator=g))
                x0, t, noise = torch.cat(x0), torch.cat(t), torch.cat(noise)
                a = ac[t].reshape(-1, 1, 1, 1)
                out = unet(a.sqrt() * x0 + (1 - a).sqrt() * noise, t.float(), context=context)
                per_sample = F.mse_loss(out, diffusion_target(model.config.prediction, x0, noise, a),
                                        reduction="none").mean(dim=(1, 2, 3))
                per_job = per_sample.reshape(k, b).mean(1)
                opt.zero_grad(set_to_none=True)
                per_job.sum().backward()   # jobs share no parameters: each gets its own mean-loss gradient
                opt.step()
                losses[step] = per_job.detach().numpy()
                if progress:
                    progress(step + 1, s.steps)
    finally:
        for h in handles:
            h.remove()
    log.info("%d LoRAs (rank %d, %d steps × %d images each) in %.0f s", k, s.rank, s.steps, b,
             time.perf_counter() - start)
    tail = losses[-max(1, s.steps // 10):].mean(0)
    return [({name: (up[j].detach().clone(), down[j].detach().clone()) for name, (up, down) in params.items()},
             float(tail[j])) for j in range(k)]
