"""A tiny model with SDXL's topology, built in code with random weights (test-only).

Real SDXL checkpoints cannot be downloaded in CI, and a full SDXL does not fit a 2-core test
budget. This model keeps every *name* of SDXL's UNet that a kohya LoRA targets
(`input_blocks.4.1`, `input_blocks.5.1`, `input_blocks.7.1`, `input_blocks.8.1`,
`middle_block.1`, `output_blocks.0..5.1`, each with `transformer_blocks.0.attn1/attn2/ff`,
`proj_in`, `proj_out`) and the two-encoder SDXL text stack (`clip_l` + `clip_g`, pooled output
feeding the ADM input), but at widths 64/128 and depth 1, so ComfyUI's own LoRA key mapping,
patching and sampling run unchanged on it in well under a second.
"""

from __future__ import annotations

import comfy.model_management
import comfy.model_patcher
import comfy.sd
import comfy.sd1_clip
import comfy.sdxl_clip
import comfy.supported_models
import comfy.taesd.taesd
import torch

MODEL_CHANNELS = 32          # widths 32 / 64 / 128 (SDXL: 320 / 640 / 1280)
TEXT_WIDTH = 32              # each text encoder's hidden width (SDXL: 768 / 1280)
TEXT_LAYERS = 3           # layer_idx=-2 (penultimate, as SDXL) needs more than 2
CONTEXT_DIM = 2 * TEXT_WIDTH  # clip_l and clip_g hidden states are concatenated, as in SDXL
POOLED_DIM = TEXT_WIDTH       # clip_g's projected pooled output
# SDXL's ADM input = pooled text embedding + 6 size/crop embeddings of 256 each.
ADM_IN_CHANNELS = POOLED_DIM + 6 * 256

UNET_CONFIG = {
    "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
    "legacy": False, "num_classes": "sequential", "adm_in_channels": ADM_IN_CHANNELS,
    "in_channels": 4, "model_channels": MODEL_CHANNELS, "num_res_blocks": [2, 2, 2],
    "transformer_depth": [0, 0, 1, 1, 1, 1], "channel_mult": [1, 2, 4],
    "transformer_depth_middle": 1, "use_linear_in_transformer": True,
    "context_dim": CONTEXT_DIM, "num_head_channels": 16,
    "transformer_depth_output": [0, 0, 0, 1, 1, 1, 1, 1, 1],
    "use_temporal_attention": False, "use_temporal_resblock": False,
}


def _text_config(hidden_act: str) -> dict:
    return {
        "architectures": ["CLIPTextModel"], "attention_dropout": 0.0, "bos_token_id": 0,
        "dropout": 0.0, "eos_token_id": 49407, "hidden_act": hidden_act,
        "hidden_size": TEXT_WIDTH, "initializer_factor": 1.0, "initializer_range": 0.02,
        "intermediate_size": 2 * TEXT_WIDTH, "layer_norm_eps": 1e-05,
        "max_position_embeddings": 77, "model_type": "clip_text_model",
        "num_attention_heads": 2, "num_hidden_layers": TEXT_LAYERS, "pad_token_id": 1,
        # The real tokenizer is used, so the vocabulary keeps its real size.
        "projection_dim": POOLED_DIM, "torch_dtype": "float32", "vocab_size": 49408,
    }


class TinySDXLClipModel(comfy.sdxl_clip.SDXLClipModel):
    """SDXLClipModel with both encoders shrunk; attribute names (clip_l / clip_g) kept, so
    ComfyUI maps `lora_te1_*` / `lora_te2_*` keys onto it exactly as onto a real SDXL."""

    def __init__(self, device="cpu", dtype=None, model_options={}):  # noqa: B006 - never mutated; ComfyUI passes it
        torch.nn.Module.__init__(self)
        self.clip_l = comfy.sd1_clip.SDClipModel(
            layer="hidden", layer_idx=-2, device=device, dtype=dtype, layer_norm_hidden_state=False,
            textmodel_json_config=_text_config("quick_gelu"), model_options=model_options)
        self.clip_g = comfy.sd1_clip.SDClipModel(
            layer="hidden", layer_idx=-2, device=device, dtype=dtype, layer_norm_hidden_state=False,
            textmodel_json_config=_text_config("gelu"), return_projected_pooled=True,
            special_tokens={"start": 49406, "end": 49407, "pad": 0},
            model_options={**model_options, "model_name": "clip_g"})
        self.dtypes = {dtype}


class _ClipTarget:
    clip = TinySDXLClipModel
    tokenizer = comfy.sdxl_clip.SDXLTokenizer
    params: dict = {}


def random_state_dict(module: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """Deterministic weights for `module`: norms at identity, everything else small noise
    (large enough that a LoRA's ΔW is not lost in rounding, small enough to stay finite)."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for key, value in sorted(module.state_dict().items()):
        if not torch.is_floating_point(value):
            out[key] = value
        elif "norm" in key:
            out[key] = torch.ones_like(value, dtype=torch.float32) if key.endswith("weight") \
                else torch.zeros_like(value, dtype=torch.float32)
        else:
            out[key] = torch.randn(value.shape, generator=gen, dtype=torch.float32) * 0.05
    return out


def build_model(seed: int, channels: int = MODEL_CHANNELS, dtype: torch.dtype = torch.float32):
    """The tiny UNet, float32 by default so that patched weights can be compared with the
    library's ΔW to ~1e-6. `channels`/`dtype` serve the GPU check: under dynamic VRAM ComfyUI
    loads modules of 16 KiB or less whole (no per-cast patches), so it uses wider layers, and
    fp16 storage for the low-precision patch path. The patcher is the one ComfyUI's own loaders
    use (`CoreModelPatcher`: the dynamic-VRAM one where that is on, 2026)."""
    config = comfy.supported_models.SDXL(dict(UNET_CONFIG, model_channels=channels))
    config.set_inference_dtype(dtype, None)
    model = config.get_model({}, device=comfy.model_management.unet_offload_device())
    model.load_model_weights(random_state_dict(model.diffusion_model, seed), "")
    patcher = getattr(comfy.model_patcher, "CoreModelPatcher", comfy.model_patcher.ModelPatcher)
    return patcher(model, load_device=comfy.model_management.get_torch_device(),
                   offload_device=comfy.model_management.unet_offload_device())


def build_clip(seed: int) -> comfy.sd.CLIP:
    clip = comfy.sd.CLIP(_ClipTarget, model_options={"dtype": torch.float32})
    weights = random_state_dict(clip.cond_stage_model, seed + 1)
    missing, unexpected = clip.cond_stage_model.load_state_dict(weights, strict=False)
    if unexpected:
        raise RuntimeError(f"tiny CLIP: unexpected keys {unexpected[:5]}")
    return clip


def build_vae(seed: int) -> comfy.sd.VAE:
    """A random-weight TAESD-shaped VAE (ComfyUI recognises it by its keys): lets VAE Decode run
    in a prompt with no VAE file. Its pictures are noise, which is all a wiring test needs."""
    module = comfy.taesd.taesd.TAESD(latent_channels=4)
    weights = random_state_dict(module, seed + 2)
    weights["vae_scale"], weights["vae_shift"] = torch.tensor(1.0), torch.tensor(0.0)
    return comfy.sd.VAE(sd=weights)
