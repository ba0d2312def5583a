"""Synthetic LoRAs at real SDXL shapes, in every key layout — for tests and the benchmark
(real LoRAs cannot be downloaded here). Values are random but sized like trained LoRAs."""

from __future__ import annotations

import torch

from .. import naming

KEY_LAYOUTS = ("kohya", "kohya_diffusers", "diffusers_old", "diffusers_processor",
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


def _module_key(name: str, layout: str) -> tuple[str, str, str]:
    """(module prefix, up suffix, down suffix) for a canonical layer name in the key `layout`."""
    if naming.is_text_encoder(name):
        encoder, path = name.split(".", 1)
        if layout.startswith("kohya") or layout == "comfyui":
            return f"lora_{encoder}_{naming.flatten(path)}", ".lora_up.weight", ".lora_down.weight"
        hf = "text_encoder" if encoder == "te1" else "text_encoder_2"
        return f"{hf}.{path}", ".lora_B.weight", ".lora_A.weight"
    if layout == "kohya":
        return f"lora_unet_{naming.flatten(name)}", ".lora_up.weight", ".lora_down.weight"
    if layout == "comfyui":
        return f"diffusion_model.{name}", ".lora_up.weight", ".lora_down.weight"
    path = naming.ldm_to_diffusers(name)
    if layout == "kohya_diffusers":
        return f"lora_unet_{naming.flatten(path)}", ".lora_up.weight", ".lora_down.weight"
    if layout == "diffusers_old":  # what the official LoRA.rar training wrote
        return f"unet.unet.{path}", ".lora.up.weight", ".lora.down.weight"
    if layout == "diffusers_processor":
        attn, proj = path.rsplit(".", 1) if not path.endswith("to_out.0") else (path[:-9], "to_out")
        return f"unet.{attn}.processor.{proj}", "_lora.up.weight", "_lora.down.weight"
    if layout in ("peft", "peft_default"):
        default = ".default" if layout == "peft_default" else ""
        return f"unet.{path}", f".lora_B{default}.weight", f".lora_A{default}.weight"
    raise ValueError(f"unknown key layout {layout!r}; known: {KEY_LAYOUTS}")


def to_state_dict(factors: dict[str, tuple[torch.Tensor, torch.Tensor]], layout: str = "kohya",
                  alpha: float | None = None) -> dict[str, torch.Tensor]:
    """Write factors as a LoRA state dict in the key `layout`; `alpha` adds `.alpha` keys
    (kohya-style families only; the diffusers families have none, i.e. scale 1)."""
    sd = {}
    for name, (up, down) in factors.items():
        module, up_suffix, down_suffix = _module_key(name, layout)
        sd[module + up_suffix] = up.contiguous()
        sd[module + down_suffix] = down.contiguous()
        if alpha is not None and up_suffix == ".lora_up.weight":
            sd[module + ".alpha"] = torch.tensor(float(alpha))
    return sd


def sdxl_lora(rank: int = 64, seed: int = 0, layout: str = "kohya", alpha: float | None = None,
              dtype: torch.dtype = torch.float32, te_layers: int = 2) -> dict[str, torch.Tensor]:
    return to_state_dict(random_factors(sdxl_layer_shapes(te_layers), rank, seed, dtype), layout, alpha)


# ---------------------------------------------------------------------------------------------
# Third-party layouts, byte for byte as their writers produce them (diffusers 0.42 / peft 0.21 /
# transformers 5), so the reader is tested on them even where those packages are not installed.

def peft_lora_config(r: int = 4, lora_alpha: float = 4, target_modules=("to_q", "to_k", "to_v", "to_out.0"),
                     rank_pattern: dict | None = None, alpha_pattern: dict | None = None,
                     use_rslora: bool = False) -> dict:
    """What `peft.LoraConfig(...).to_dict()` gives (peft 0.21), the dict diffusers stores per
    component in `lora_adapter_metadata` and peft writes as adapter_config.json."""
    return {
        "alora_invocation_tokens": None, "alpha_pattern": dict(alpha_pattern or {}), "arrow_config": None,
        "auto_mapping": None, "base_model_name_or_path": None, "bias": "none", "corda_config": None,
        "ensure_weight_tying": False, "eva_config": None, "exclude_modules": None, "fan_in_fan_out": False,
        "inference_mode": False, "init_lora_weights": "gaussian", "kasa_config": None, "layer_replication": None,
        "layers_pattern": None, "layers_to_transform": None, "loftq_config": {}, "lora_alpha": lora_alpha,
        "lora_bias": False, "lora_dropout": 0.0, "lora_ga_config": None, "megatron_config": None,
        "megatron_core": "megatron.core", "modules_to_save": None, "monteclora_config": None,
        "peft_type": "LORA", "peft_version": "0.21.2", "qalora_group_size": 16, "r": r,
        "rank_pattern": dict(rank_pattern or {}), "revision": None, "target_modules": list(target_modules),
        "target_parameters": None, "task_type": None, "trainable_token_indices": None, "use_bdlora": None,
        "use_dora": False, "use_qalora": False, "use_rslora": use_rslora, "velora_config": None,
    }


def _pattern_value(patterns: dict, module: str, default):
    """peft's get_pattern_key for the fixtures: the first key with (.*\\.)?(key)$."""
    import re

    return next((v for k, v in patterns.items() if re.match(rf"(.*\.)?({k})$", module)), default)


# diffusers' PEFT_TO_DIFFUSERS renames only attention projections; every other module keeps
# peft's lora_A/lora_B in the file.
_DIFFUSERS_UNET_SUFFIXES = {p: (".lora.up.weight", ".lora.down.weight") for p in ("to_q", "to_k", "to_v", "to_out.0")}
_DIFFUSERS_TEXT_SUFFIXES = {p: (".lora_linear_layer.up.weight", ".lora_linear_layer.down.weight")
                            for p in ("q_proj", "k_proj", "v_proj", "out_proj")}


def diffusers_module(name: str) -> tuple[str, str]:
    """Canonical layer name → (component, module path inside it) as diffusers/transformers 5 name
    them: `te1.text_model.encoder…` is `text_encoder` / `encoder…` (CLIPTextModel is flattened),
    `te2.` keeps `text_model.` (CLIPTextModelWithProjection)."""
    if name.startswith("te1.text_model."):
        return "text_encoder", name[len("te1.text_model."):]
    if name.startswith("te2."):
        return "text_encoder_2", name[len("te2."):]
    return "unet", naming.ldm_to_diffusers(name)


def diffusers_lora(shapes: dict[str, tuple[int, int]], settings: dict[str, dict], seed: int = 0,
                   dtype: torch.dtype = torch.float32) -> tuple[dict[str, torch.Tensor], dict[str, str], dict]:
    """(state dict, header metadata, effective scales) of a file as diffusers' `save_lora_weights`
    writes it after `convert_state_dict_to_diffusers(get_peft_model_state_dict(model))`:
    `unet.…to_q.lora.down.weight`, `text_encoder.encoder.layers.N….lora_linear_layer.down.weight`,
    other modules `….lora_A.weight`, no alpha tensors, and the header entry `lora_adapter_metadata`
    = json.dumps({"unet.r": …, "unet.lora_alpha": …, …}, indent=2, sort_keys=True).

    `settings` maps component → peft_lora_config(...) dict; ranks and scales per layer follow it
    (rank_pattern, alpha_pattern, use_rslora). The scales come back by canonical name."""
    import json

    ranks, scales = {}, {}
    for name in shapes:
        component, module = diffusers_module(name)
        config = settings[component]
        r = _pattern_value(config["rank_pattern"], module, config["r"])
        alpha = _pattern_value(config["alpha_pattern"], module, config["lora_alpha"])
        ranks[name] = r
        scales[name] = alpha / (r ** 0.5 if config["use_rslora"] else r)
    factors = random_factors(shapes, ranks, seed, dtype)
    sd = {}
    for name, (up, down) in factors.items():
        component, module = diffusers_module(name)
        last = "to_out.0" if module.endswith("to_out.0") else module.rsplit(".", 1)[-1]
        table = _DIFFUSERS_UNET_SUFFIXES if component == "unet" else _DIFFUSERS_TEXT_SUFFIXES
        up_suffix, down_suffix = table.get(last, (".lora_B.weight", ".lora_A.weight"))
        sd[f"{component}.{module}{up_suffix}"] = up.contiguous()
        sd[f"{component}.{module}{down_suffix}"] = down.contiguous()
    packed = {f"{component}.{k}": v for component, config in settings.items() for k, v in config.items()}
    metadata = {"format": "pt", "lora_adapter_metadata": json.dumps(packed, indent=2, sort_keys=True)}
    return sd, metadata, scales


def diffusers_kohya_lora(shapes: dict[str, tuple[int, int]], rank: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    """What diffusers' `convert_state_dict_to_kohya` (the training scripts' --output_kohya_format)
    writes: `lora_unet_down_blocks_1_attentions_0_…`, `lora_te1_encoder_layers_N_…` (transformers 5
    names, no text_model), `lora_te2_text_model_encoder_layers_N_…`, and an int64 0-dim alpha equal
    to the rank (`torch.tensor(len(down))`)."""
    sd = {}
    for name, (up, down) in random_factors(shapes, rank, seed).items():
        component, module = diffusers_module(name)
        prefix = {"unet": "lora_unet", "text_encoder": "lora_te1", "text_encoder_2": "lora_te2"}[component]
        key = f"{prefix}_{naming.flatten(module)}"
        sd[f"{key}.lora_up.weight"] = up.contiguous()
        sd[f"{key}.lora_down.weight"] = down.contiguous()
        sd[f"{key}.alpha"] = torch.tensor(len(down))
    return sd


def peft_adapter(shapes: dict[str, tuple[int, int]], config: dict, seed: int = 0) -> tuple[dict[str, torch.Tensor], dict]:
    """(adapter_model.safetensors state dict, effective scales) as peft's `save_pretrained` writes
    it for a wrapped diffusers UNet: `base_model.model.down_blocks.….lora_A.weight`, no alpha; the
    alpha lives in adapter_config.json (`config`, e.g. peft_lora_config(...))."""
    ranks, scales = {}, {}
    for name in shapes:
        module = naming.ldm_to_diffusers(name)
        r = _pattern_value(config["rank_pattern"], module, config["r"])
        alpha = _pattern_value(config["alpha_pattern"], module, config["lora_alpha"])
        ranks[name] = r
        scales[name] = alpha / (r ** 0.5 if config["use_rslora"] else r)
    sd = {}
    for name, (up, down) in random_factors(shapes, ranks, seed).items():
        module = f"base_model.model.{naming.ldm_to_diffusers(name)}"
        sd[f"{module}.lora_A.weight"] = down.contiguous()
        sd[f"{module}.lora_B.weight"] = up.contiguous()
    return sd, scales
