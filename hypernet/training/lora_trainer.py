"""Train an ordinary LoRA (DreamBooth-style) on a frozen UNet: the kohya layer set, ε-prediction.

Every Linear inside the transformer blocks (`proj_in`, `proj_out`, `attn1/attn2.to_q/k/v/out.0`,
`ff.net.0.proj`, `ff.net.2` — what kohya's default SDXL LoRA touches) gets factors
`up` (out × r, zeros) and `down` (r × in, random), added by forward hooks as
x·downᵀ·upᵀ·(alpha/r); the base weights never change. The loss is the usual diffusion loss on a
handful of examples (latent + prompt conditioning), noised with random timesteps. The result is
written as a kohya file (`save_kohya`) that `read_lora`, `inspect` and `merge` read like any other.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .injection import find_module, linear_layer_shapes
from .objective import Cond, Denoise

log = logging.getLogger(__name__)

Factors = dict[str, tuple[torch.Tensor, torch.Tensor]]


@dataclass
class LoraTrainSettings:
    rank: int = 4
    alpha: float | None = None     # None: alpha = rank (scale 1)
    steps: int = 150
    batch: int = 16
    lr: float = 5e-3
    seed: int = 0
    only: tuple[str, ...] = ()     # train only layers whose name contains one of these (default: all)
    target: str = "noise"          # what the UNet predicts: "noise" (ε) or "x0" (the clean sample)


def _noisy(schedule, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    if hasattr(schedule, "alphas_cumprod"):
        a = schedule.alphas_cumprod.float()[t].reshape(-1, *([1] * (x0.dim() - 1)))
        return a.sqrt() * x0 + (1 - a).sqrt() * noise
    return torch.cat([schedule.noisy_input(x0[i:i + 1], noise[i:i + 1], int(t[i]))[0] for i in range(len(t))])


def train_lora(unet: torch.nn.Module, denoise: Denoise, schedule, examples: list[tuple[torch.Tensor, Cond]],
               settings: LoraTrainSettings | None = None,
               progress: Callable[[int, int, float], None] | None = None) -> tuple[Factors, list[float]]:
    """Factors {canonical name: (up · alpha/r, down)} and the loss history."""
    s = settings or LoraTrainSettings()
    shapes = {n: sh for n, sh in linear_layer_shapes(unet).items() if not s.only or any(o in n for o in s.only)}
    if not shapes:
        raise ValueError("the UNet has no transformer-block Linear layers to train a LoRA on")
    scale = (s.alpha if s.alpha is not None else s.rank) / s.rank
    gen = torch.Generator().manual_seed(s.seed)
    params: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for name, (out, inp) in shapes.items():
        down = (torch.randn(s.rank, inp, generator=gen) / inp ** 0.5).requires_grad_(True)
        up = torch.zeros(out, s.rank, requires_grad=True)
        params[name] = (up, down)
    handles = []
    for name, (up, down) in params.items():
        module = find_module(unet, name)

        def hook(mod, args, output, up=up, down=down):
            return output + F.linear(F.linear(args[0], down), up) * scale
        handles.append(module.register_forward_hook(hook))
    latents = torch.cat([e[0] for e in examples])
    contexts = torch.cat([e[1]["context"] for e in examples])
    opt = torch.optim.Adam([p for pair in params.values() for p in pair], lr=s.lr)
    steps_total = len(getattr(schedule, "alphas_cumprod", range(1000)))
    losses = []
    start = time.perf_counter()
    try:
        with torch.enable_grad():
            for step in range(s.steps):
                idx = torch.randint(len(examples), (s.batch,), generator=gen)
                x0 = latents[idx]
                t = torch.randint(0, steps_total, (s.batch,), generator=gen)
                noise = torch.randn(x0.shape, generator=gen)
                pred = denoise(_noisy(schedule, x0, noise, t), t.float(), {"context": contexts[idx]})
                loss = F.mse_loss(pred.float(), x0 if s.target == "x0" else noise)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                losses.append(float(loss.detach()))
                if progress:
                    progress(step + 1, s.steps, losses[-1])
    finally:
        for h in handles:
            h.remove()
    log.debug("LoRA: %d layers, rank %d, %d steps in %.1f s, loss %.4f", len(params), s.rank, s.steps,
              time.perf_counter() - start, sum(losses[-20:]) / len(losses[-20:]))
    factors = {n: (up.detach() * scale, down.detach()) for n, (up, down) in params.items()}
    return factors, losses


def save_kohya(factors: Factors, path: Path, metadata: dict[str, str] | None = None) -> Path:
    """Write factors (up already carrying alpha/r) as a kohya LoRA with alpha = rank (scale 1)."""
    from safetensors.torch import save_file

    from ..tooling.synthetic import to_state_dict

    sd = {}
    for name, (up, down) in factors.items():
        sd.update(to_state_dict({name: (up.float(), down.float())}, "kohya", alpha=float(down.shape[0])))
    rank = max(down.shape[0] for _, down in factors.values())
    meta = {"ss_network_module": "networks.lora", "ss_network_dim": str(rank), "ss_network_alpha": str(rank),
            **(metadata or {})}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp), meta)
    tmp.replace(path)
    return path
