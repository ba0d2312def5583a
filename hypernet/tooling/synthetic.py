"""Synthetic LoRAs at real SDXL shapes, in every naming family — for tests and the benchmark
(real LoRAs cannot be downloaded here). Values are random but sized like trained LoRAs."""

from __future__ import annotations

import torch

from .. import naming

NAMING_FAMILIES = ("kohya", "kohya_diffusers", "diffusers_old", "diffusers_processor",
                   "peft", "peft_default", "comfyui")

# CLIP-L (te1) and CLIP-G (te2): hidden width and number of layers
TEXT_ENCODERS = {"te1": (768, 12), "te2": (1280, 32)}


def text_encoder_layers(te_layers: int) -> dict[str, tuple[int, int]]:
    layers = {}
    for encoder, (width, depth) in TEXT_ENCODERS.items():
        for i in range(min(te_layers, depth)):
            prefix = f"{encoder}.text_model.encoder.layers.{i}"
            for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
                layers[f"{prefix}.self_attn.{proj}"] = (width, width)
            layers[f"{prefix}.mlp.fc1"] = (width * 4, width)
            layers[f"{prefix}.mlp.fc2"] = (width, width * 4)
    return layers


def sdxl_layer_shapes(te_layers: int = 2) -> dict[str, tuple[int, int]]:
    """All 722 kohya SDXL UNet targets plus the first `te_layers` layers of each text encoder."""
    return {**naming.sdxl_linear_layers(), **text_encoder_layers(te_layers)}


def random_factors(shapes: dict[str, tuple[int, int]], rank: int | dict[str, int], seed: int,
                   dtype: torch.dtype = torch.float32) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """name → (up (out, r), down (r, in)), with ΔW entries of a trained LoRA's order (~1e-3)."""
    gen = torch.Generator().manual_seed(seed)
    factors = {}
    for name, (out, inp) in shapes.items():
        r = rank[name] if isinstance(rank, dict) else rank
        down = torch.randn(r, inp, generator=gen) / inp ** 0.5
        up = torch.randn(out, r, generator=gen) * (0.02 / r ** 0.5)
        factors[name] = (up.to(dtype), down.to(dtype))
    return factors


def _module_key(name: str, family: str) -> tuple[str, str, str]:
    """(module prefix, up suffix, down suffix) for a canonical layer name in `family`."""
    if naming.is_text_encoder(name):
        encoder, path = name.split(".", 1)
        if family.startswith("kohya") or family == "comfyui":
            return f"lora_{encoder}_{naming.flatten(path)}", ".lora_up.weight", ".lora_down.weight"
        hf = "text_encoder" if encoder == "te1" else "text_encoder_2"
        return f"{hf}.{path}", ".lora_B.weight", ".lora_A.weight"
    if family == "kohya":
        return f"lora_unet_{naming.flatten(name)}", ".lora_up.weight", ".lora_down.weight"
    if family == "comfyui":
        return f"diffusion_model.{name}", ".lora_up.weight", ".lora_down.weight"
    path = naming.ldm_to_diffusers(name)
    if family == "kohya_diffusers":
        return f"lora_unet_{naming.flatten(path)}", ".lora_up.weight", ".lora_down.weight"
    if family == "diffusers_old":  # what the official LoRA.rar training wrote
        return f"unet.unet.{path}", ".lora.up.weight", ".lora.down.weight"
    if family == "diffusers_processor":
        attn, proj = path.rsplit(".", 1) if not path.endswith("to_out.0") else (path[:-9], "to_out")
        return f"unet.{attn}.processor.{proj}", "_lora.up.weight", "_lora.down.weight"
    if family in ("peft", "peft_default"):
        default = ".default" if family == "peft_default" else ""
        return f"unet.{path}", f".lora_B{default}.weight", f".lora_A{default}.weight"
    raise ValueError(f"unknown naming family {family!r}; known: {NAMING_FAMILIES}")


def to_state_dict(factors: dict[str, tuple[torch.Tensor, torch.Tensor]], family: str = "kohya",
                  alpha: float | None = None) -> dict[str, torch.Tensor]:
    """Write factors as a LoRA state dict in `family` naming; `alpha` adds `.alpha` keys
    (kohya-style families only; the diffusers families have none, i.e. scale 1)."""
    sd = {}
    for name, (up, down) in factors.items():
        module, up_suffix, down_suffix = _module_key(name, family)
        sd[module + up_suffix] = up.contiguous()
        sd[module + down_suffix] = down.contiguous()
        if alpha is not None and up_suffix == ".lora_up.weight":
            sd[module + ".alpha"] = torch.tensor(float(alpha))
    return sd


def sdxl_lora(rank: int = 64, seed: int = 0, family: str = "kohya", alpha: float | None = None,
              dtype: torch.dtype = torch.float32, te_layers: int = 2) -> dict[str, torch.Tensor]:
    return to_state_dict(random_factors(sdxl_layer_shapes(te_layers), rank, seed, dtype), family, alpha)
