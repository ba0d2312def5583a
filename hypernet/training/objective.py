"""ZipLoRA's objective (docs/training.md), the loss both ZipLoRA and LoRA.rar's trainer minimise.

For one subject input (latent + prompt conditioning) and one style input, noised with the
*same* noise and timestep:

    L = MSE(merged(subject), content_only(subject)) + MSE(merged(style), style_only(style))
        + λ · Σ_layers |cos(m_c, m_s)|,  λ = 0.01

Four UNet passes: the merged model on both inputs with grad, the single-LoRA models on their
own input without grad. The UNet is called through `denoise(x_t, t, cond)` so any UNet works:
ComfyUI's UNetModel (`forward(x, timesteps, context, y)`), a diffusers UNet, the test UNet.
Noising follows the model's own schedule: `DiscreteSchedule` (SDXL's ε-prediction scaled-linear
schedule by default) or `ComfyModelSampling` wrapping ComfyUI's `model.model.model_sampling`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import TrainingError
from .injection import Coefficients, LoraInjection

LAMBDA = 0.01
Cond = dict[str, torch.Tensor]
Denoise = Callable[[torch.Tensor, torch.Tensor, Cond], torch.Tensor]


# ---------------------------------------------------------------------------------------------
# Schedules: x0, noise, timestep index → (UNet input, timestep value)

class DiscreteSchedule:
    """DDPM-style discrete schedule: x_t = √ᾱ_t·x0 + √(1-ᾱ_t)·ε, fed with timestep t."""

    def __init__(self, alphas_cumprod: torch.Tensor):
        self.alphas_cumprod = alphas_cumprod.double()
        self.num_timesteps = len(alphas_cumprod)

    @classmethod
    def scaled_linear(cls, beta_start: float = 0.00085, beta_end: float = 0.012, steps: int = 1000) -> "DiscreteSchedule":
        """SDXL's (and SD1.5's) schedule; ComfyUI calls it "linear" in make_beta_schedule."""
        betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, steps, dtype=torch.float64) ** 2
        return cls(torch.cumprod(1 - betas, dim=0))

    def noisy_input(self, x0: torch.Tensor, noise: torch.Tensor, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        a = float(self.alphas_cumprod[t])
        x_t = x0 * a ** 0.5 + noise * (1 - a) ** 0.5
        return x_t, torch.full((x0.shape[0],), float(t), device=x0.device)


class ComfyModelSampling:
    """ComfyUI's `model.model.model_sampling` (duck-typed: sigmas, noise_scaling,
    calculate_input, timestep), so ε, v and flow models all noise the way they were trained."""

    def __init__(self, model_sampling):
        self.ms = model_sampling
        self.num_timesteps = len(model_sampling.sigmas)

    def noisy_input(self, x0: torch.Tensor, noise: torch.Tensor, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        sigma = self.ms.sigmas[t].to(x0.device).reshape(1).expand(x0.shape[0])
        x = self.ms.noise_scaling(sigma, noise, x0)
        return self.ms.calculate_input(sigma, x), self.ms.timestep(sigma).float()


# ---------------------------------------------------------------------------------------------
# Denoiser adapters

def ldm_denoiser(unet: torch.nn.Module, dtype: torch.dtype | None = None) -> Denoise:
    """ComfyUI UNetModel / the test UNet: forward(x, timesteps, context, y)."""
    def denoise(x: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        d = dtype or x.dtype
        y = cond.get("y")
        return unet(x.to(d), t, context=cond["context"].to(d), y=None if y is None else y.to(d))
    return denoise


# ---------------------------------------------------------------------------------------------
# The objective

@dataclass
class Sample:
    """One objective evaluation's inputs: a subject input and a style input."""

    subject_latent: torch.Tensor   # (1, C, h, w), already in the model's latent space
    subject_cond: Cond
    style_latent: torch.Tensor
    style_cond: Cond


@dataclass
class LossTerms:
    total: torch.Tensor   # with graph (when coefficients require grad)
    content: float        # MSE(merged(subject), content_only(subject))
    style: float          # MSE(merged(style), style_only(style))
    cosine: float         # λ · Σ |cos(m_c, m_s)|

    def as_dict(self) -> dict[str, float]:
        return {"total": float(self.total.detach()), "content": self.content,
                "style": self.style, "cosine": self.cosine}


def draw_noise(shape: tuple[int, ...], generator: torch.Generator, num_timesteps: int = 1000) -> tuple[int, torch.Tensor]:
    """t ~ U[0, T) and ε ~ N(0, I), on the CPU generator so results do not depend on the device."""
    t = int(torch.randint(0, num_timesteps, (1,), generator=generator))
    return t, torch.randn(shape, generator=generator)


def cosine_penalty(coefficients: Coefficients) -> torch.Tensor:
    """Σ_layers |cos(m_c, m_s)| (0 when there are no coefficient layers)."""
    terms = [F.cosine_similarity(m_c.float(), m_s.float(), dim=0).abs() for m_c, m_s in coefficients.values()]
    return torch.stack(terms).sum() if terms else torch.zeros(())


def ones_coefficients(injection: LoraInjection, device=None) -> Coefficients:
    """m = 1 everywhere: the merged mode then equals the plain sum."""
    return {name: (torch.ones(w, device=device), torch.ones(w, device=device))
            for name, w in injection.target_widths().items()}


def ziplora_objective(injection: LoraInjection, denoise: Denoise, schedule, sample: Sample,
                      coefficients: Coefficients, t: int, noise: torch.Tensor, lam: float = LAMBDA,
                      autocast_dtype: torch.dtype | None = None) -> LossTerms:
    """The four-pass objective for one (subject, style) sample; see the module docstring."""
    if sample.subject_latent.shape != sample.style_latent.shape:
        raise TrainingError(
            f"subject latent {tuple(sample.subject_latent.shape)} and style latent "
            f"{tuple(sample.style_latent.shape)} differ; they share one noise tensor, so encode both "
            "images at the same resolution")
    device = sample.subject_latent.device
    noise = noise.to(device=device, dtype=sample.subject_latent.dtype)
    x_subject, timestep = schedule.noisy_input(sample.subject_latent, noise, t)
    x_style, _ = schedule.noisy_input(sample.style_latent, noise, t)
    autocast = (torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None
                else torch.autocast(device.type, enabled=False))
    previous_mode, previous_coefficients = injection.mode, injection.coefficients
    try:
        with autocast:
            with torch.no_grad():
                injection.mode = "content"
                target_subject = denoise(x_subject, timestep, sample.subject_cond).float()
                injection.mode = "style"
                target_style = denoise(x_style, timestep, sample.style_cond).float()
            injection.mode, injection.coefficients = "merged", coefficients
            merged_subject = denoise(x_subject, timestep, sample.subject_cond).float()
            merged_style = denoise(x_style, timestep, sample.style_cond).float()
    finally:
        injection.mode, injection.coefficients = previous_mode, previous_coefficients
    content = F.mse_loss(merged_subject, target_subject)
    style = F.mse_loss(merged_style, target_style)
    cosine = lam * cosine_penalty(coefficients).to(content.device)
    total = content + style + cosine
    return LossTerms(total, float(content.detach()), float(style.detach()), float(cosine.detach()))
