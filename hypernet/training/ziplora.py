"""ZipLoRA (Shah et al. 2023) for one subject/style pair: optimise free merge coefficients.

Per merged layer (the same layer set LoRA.rar's hypernetwork merges: `to_q`, `to_out.0` of
attn1/attn2, configurable) two free vectors m_c, m_s with one entry per input column,
initialised to 1, are optimised with Adam (lr 0.01, 100 steps by default) on the ZipLoRA
objective (objective.py). The result is the same exact low-rank `MergedLora` the hypernetwork
merge produces (`merged.assemble(..., method="ziplora")`), plus the per-step loss history.

This is the slow baseline LoRA.rar replaces: four UNet passes and a backward per step.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..errors import TrainingError
from ..lora import LoraFile
from ..merged import MergedLora, assemble
from ..model import DEFAULT_TARGETS
from .injection import LoraInjection
from .objective import LAMBDA, Cond, Denoise, Sample, draw_noise, ziplora_objective

log = logging.getLogger(__name__)

# (latent (1, C, h, w), conditioning) for one training image
Example = tuple[torch.Tensor, Cond]


@dataclass
class ZipLoraSettings:
    steps: int = 100
    lr: float = 0.01
    lam: float = LAMBDA
    seed: int = 0
    targets: tuple[str, ...] = DEFAULT_TARGETS
    content_strength: float = 1.0  # applied to the result only; never changes the optimisation
    style_strength: float = 1.0


@dataclass
class ZipLoraResult:
    merged: MergedLora
    history: list[dict[str, float]] = field(default_factory=list)  # one entry per step
    seconds: float = 0.0


def ziplora_merge(unet: torch.nn.Module, denoise: Denoise, schedule, content: LoraFile, style: LoraFile,
                  subject_examples: list[Example], style_examples: list[Example],
                  settings: ZipLoraSettings | None = None, device: torch.device | str | None = None,
                  autocast_dtype: torch.dtype | None = None,
                  progress: Callable[[int, int, dict], None] | None = None,
                  check_interrupt: Callable[[], None] | None = None) -> ZipLoraResult:
    """Run ZipLoRA for one pair. Each step draws one subject and one style example, a shared
    timestep and noise (seeded), and takes one Adam step on all m_c, m_s.

    `progress(step, steps, losses)` is called after every step; `check_interrupt()` before
    every step (it raises to stop, as ComfyUI's interrupt check does).
    """
    settings = settings or ZipLoraSettings()
    if not subject_examples or not style_examples:
        raise TrainingError("ZipLoRA needs at least one subject example and one style example")
    if settings.steps < 1:
        raise TrainingError(f"ZipLoRA needs at least 1 step, got {settings.steps}")
    device = torch.device(device or next(unet.parameters()).device)
    start = time.perf_counter()
    generator = torch.Generator().manual_seed(settings.seed)
    with LoraInjection(unet, content, style, settings.targets, device=device) as injection:
        widths = injection.target_widths()
        if not widths:
            raise TrainingError(
                f"the content LoRA ({content.source}) and the style LoRA ({style.source}) share no "
                f"layer ending in {'/'.join(settings.targets)}; there is nothing for ZipLoRA to merge")
        params = {name: (torch.ones(w, device=device, requires_grad=True),
                         torch.ones(w, device=device, requires_grad=True)) for name, w in widths.items()}
        optimizer = torch.optim.Adam([p for pair in params.values() for p in pair], lr=settings.lr)
        history = []
        for step in range(settings.steps):
            if check_interrupt:
                check_interrupt()
            subject = subject_examples[int(torch.randint(len(subject_examples), (1,), generator=generator))]
            style_ex = style_examples[int(torch.randint(len(style_examples), (1,), generator=generator))]
            sample = Sample(subject[0].to(device), _to(subject[1], device),
                            style_ex[0].to(device), _to(style_ex[1], device))
            t, noise = draw_noise(tuple(sample.subject_latent.shape), generator, schedule.num_timesteps)
            optimizer.zero_grad(set_to_none=True)
            with torch.enable_grad():
                terms = ziplora_objective(injection, denoise, schedule, sample, params, t, noise,
                                          settings.lam, autocast_dtype)
                if not torch.isfinite(terms.total.detach()):
                    raise TrainingError(
                        f"ZipLoRA step {step + 1}: the objective is not finite ({terms.as_dict()}); the base "
                        "model, its VAE/text encoder or one of the LoRAs produces NaN/Inf")
                terms.total.backward()
            optimizer.step()
            record = {"step": step + 1, **terms.as_dict()}
            history.append(record)
            if progress:
                progress(step + 1, settings.steps, record)
    coefficients = {name: (m_c.detach().float().cpu(), m_s.detach().float().cpu())
                    for name, (m_c, m_s) in params.items()}
    merged = assemble(content, style, coefficients, settings.content_strength, settings.style_strength,
                      method="ziplora", method_label="merged by ZipLoRA coefficients")
    seconds = time.perf_counter() - start
    log.info("ziplora: %d steps in %.1f s, loss %.5g → %.5g; %s", settings.steps, seconds,
             history[0]["total"], history[-1]["total"], merged.report.summary())
    return ZipLoraResult(merged, history, seconds)


def _to(cond: Cond, device) -> Cond:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in cond.items()}
