"""ComfyUI's MODEL / CLIP / VAE as a `TrainingBase` — duck-typed, so this module never imports
ComfyUI (the one module in `hypernet` that does is `comfyui_bridge`, for the CLI's `--base CKPT`).

What is used (ComfyUI ≥ 0.3.60):
- MODEL (ModelPatcher): `.model` (BaseModel) → `.diffusion_model` (UNetModel,
  forward(x, timesteps, context, y)), `.model_sampling` (sigmas, noise_scaling,
  calculate_input, timestep), `.latent_format.process_in`, `.encode_adm(pooled_output=, width=,
  height=, crop_w=, crop_h=, target_width=, target_height=)` (SDXL's `y`; None for SD1.5),
  `.get_dtype()`, `.manual_cast_dtype`; `.load_device`.
- CLIP: `tokenize(text)`, `encode_from_tokens(tokens, return_pooled=True)`.
- VAE: `encode(pixels [B, H, W, C] in 0..1)`, `downscale_ratio`.
"""

from __future__ import annotations

import logging

import torch

from .data import TrainingBase
from .objective import ComfyModelSampling

log = logging.getLogger(__name__)


class ComfyEncoder:
    def __init__(self, model, clip, vae):
        self.model, self.clip, self.vae = model, clip, vae

    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        latent = self.vae.encode(image[..., :3])
        return self.model.model.latent_format.process_in(latent).float()

    def encode_prompt(self, text: str, latent_shape: tuple[int, ...]) -> dict[str, torch.Tensor]:
        tokens = self.clip.tokenize(text)
        context, pooled = self.clip.encode_from_tokens(tokens, return_pooled=True)
        cond = {"context": context.float()}
        ratio = getattr(self.vae, "downscale_ratio", 8)
        ratio = ratio if isinstance(ratio, int) else 8
        height, width = (latent_shape[-2] * ratio, latent_shape[-1] * ratio) if len(latent_shape) >= 2 else (1024, 1024)
        y = self.model.model.encode_adm(pooled_output=pooled, width=width, height=height, crop_w=0, crop_h=0,
                                        target_width=width, target_height=height, prompt_type="positive",
                                        device=context.device)
        if y is not None:
            cond["y"] = y.float()
        return cond


def _compute_dtype(base_model) -> torch.dtype:
    dtype = base_model.get_dtype()
    return getattr(base_model, "manual_cast_dtype", None) or dtype


def make_autograd_safe(module: torch.nn.Module) -> int:
    """Replace inference-mode tensors (ComfyUI runs nodes under torch.inference_mode, so weights
    loaded there are inference tensors, which autograd refuses to save for backward) with
    ordinary copies of the same values. Returns how many were replaced."""
    replaced = 0
    with torch.inference_mode(False):
        for sub in module.modules():
            for store in (sub._parameters, sub._buffers):
                for name, tensor in list(store.items()):
                    if tensor is not None and tensor.is_inference():
                        copy = tensor.clone()
                        store[name] = torch.nn.Parameter(copy, requires_grad=False) \
                            if isinstance(tensor, torch.nn.Parameter) else copy
                        replaced += 1
    return replaced


def comfy_training_base(model, clip, vae, resolution: int | None = None, family: str | None = None,
                        check_interrupt=None, description: str = "", load_model=None) -> TrainingBase:
    """A TrainingBase over a ComfyUI MODEL/CLIP/VAE. `load_model()` (e.g. comfy's
    load_models_gpu([model], force_full_load=True)) runs in `before_training`, after the data is
    encoded, because encoding with CLIP/VAE may offload the UNet."""
    base_model = model.model
    unet = base_model.diffusion_model
    device = torch.device(getattr(model, "load_device", None) or next(unet.parameters()).device)
    dtype = _compute_dtype(base_model)

    def before_training() -> None:
        with torch.inference_mode(False):
            if load_model is not None:
                load_model()
            replaced = make_autograd_safe(unet)
        if replaced:
            log.info("copied %d inference-mode UNet tensors so that gradients can flow through them", replaced)

    def denoise(x: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
        y = cond.get("y")
        return unet(x.to(dtype), t, context=cond["context"].to(dtype),
                    y=None if y is None else y.to(dtype)).float()

    name = type(base_model).__name__
    family = family or {"SDXL": "sdxl", "BaseModel": "sd15", "SD21UNCLIP": "sd2"}.get(name, name.lower())
    autocast = None
    if device.type == "cuda" and dtype in (torch.float16, torch.bfloat16):
        autocast = dtype
    return TrainingBase(unet=unet, denoise=denoise, schedule=ComfyModelSampling(base_model.model_sampling),
                        encoder=ComfyEncoder(model, clip, vae), resolution=resolution or (1024 if family == "sdxl" else 512),
                        family=family, description=description or f"ComfyUI {name}", device=device,
                        autocast_dtype=autocast, check_interrupt=check_interrupt, before_training=before_training)
