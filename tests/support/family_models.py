"""ComfyUI's own models of every family this pack reads: full size (built on the meta device, no
memory) and tiny (random weights, for patching tests), and the golden key lists made from them.

The configurations are what ComfyUI's model detection derives from each published checkpoint
(`comfy/model_detection.py`), written out; the tiny ones keep every module name the full ones have
within the blocks they keep, at small widths.

Regenerate the golden lists (hypernet/families/golden/*.json) with a ComfyUI and its venv:

    COMFYUI_PATH=/path/to/ComfyUI /path/to/venv/bin/python -m tests.support.family_models

Nothing here is imported by the library; tests import it only where a ComfyUI is available.
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

GOLDEN = Path(__file__).resolve().parents[2] / "hypernet" / "families" / "golden"

_SD = {"use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True, "legacy": False,
       "in_channels": 4, "use_temporal_attention": False, "use_temporal_resblock": False}
_WAN = {"image_model": "wan2.1", "patch_size": (1, 2, 2), "freq_dim": 256, "window_size": (-1, -1), "qk_norm": True,
        "cross_attn_norm": True, "eps": 1e-6}
_FLUX1 = {"image_model": "flux", "in_channels": 16, "out_channels": 16, "vec_in_dim": 768, "context_in_dim": 4096,
          "mlp_ratio": 4.0, "axes_dim": [16, 56, 56], "theta": 10000, "patch_size": 2, "qkv_bias": True,
          "guidance_embed": True, "txt_ids_dims": []}
_FLUX2 = {"image_model": "flux2", "in_channels": 128, "out_channels": 128, "vec_in_dim": None, "context_in_dim": 15360,
          "mlp_ratio": 3.0, "theta": 2000, "patch_size": 1, "qkv_bias": False, "guidance_embed": True,
          "txt_ids_dims": [3], "global_modulation": True, "mlp_silu_act": True, "ops_bias": False,
          "default_ref_method": "index", "ref_index_scale": 10.0}
_SD3 = {"in_channels": 16, "patch_size": 2, "out_channels": 16, "input_size": None, "adm_in_channels": 2048,
        "qk_norm": "rms", "pos_embed_scaling_factor": None}
_ZIMAGE = {"image_model": "lumina2", "patch_size": 2, "in_channels": 16, "cap_feat_dim": 2560, "qk_norm": True,
           "rope_theta": 256.0, "z_image_modulation": True, "time_scale": 1000.0, "pad_tokens_multiple": 32}

# variant id → (family id, supported_models class, unet config)
FULL = {
    "sd15": ("sd15", "SD15", dict(_SD, adm_in_channels=None, model_channels=320, num_res_blocks=[2, 2, 2, 2],
                                  transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0], channel_mult=[1, 2, 4, 4],
                                  transformer_depth_middle=1, use_linear_in_transformer=False, context_dim=768,
                                  num_heads=8, num_head_channels=-1,
                                  transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0])),
    "sd2": ("sd2", "SD20", dict(_SD, adm_in_channels=None, model_channels=320, num_res_blocks=[2, 2, 2, 2],
                                transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0], channel_mult=[1, 2, 4, 4],
                                transformer_depth_middle=1, use_linear_in_transformer=True, context_dim=1024,
                                num_heads=-1, num_head_channels=64,
                                transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0])),
    "sdxl-base": ("sdxl", "SDXL", dict(_SD, num_classes="sequential", adm_in_channels=2816, model_channels=320,
                                       num_res_blocks=[2, 2, 2], transformer_depth=[0, 0, 2, 2, 10, 10],
                                       channel_mult=[1, 2, 4], transformer_depth_middle=10,
                                       use_linear_in_transformer=True, context_dim=2048, num_head_channels=64,
                                       transformer_depth_output=[0, 0, 0, 2, 2, 2, 10, 10, 10])),
    "flux1-dev": ("flux1", "Flux", dict(_FLUX1, hidden_size=3072, num_heads=24, depth=19, depth_single_blocks=38)),
    "chroma": ("flux1", "Chroma", {"image_model": "chroma", "in_channels": 64, "out_channels": 64, "vec_in_dim": None,
                                   "context_in_dim": 4096, "hidden_size": 3072, "mlp_ratio": 4.0, "num_heads": 24,
                                   "depth": 19, "depth_single_blocks": 38, "axes_dim": [16, 56, 56], "theta": 10000,
                                   "patch_size": 2, "qkv_bias": True, "txt_ids_dims": [], "in_dim": 64,
                                   "out_dim": 3072, "hidden_dim": 5120, "n_layers": 5}),
    "flux2-dev": ("flux2", "Flux2", dict(_FLUX2, hidden_size=6144, num_heads=48, depth=8, depth_single_blocks=48,
                                         axes_dim=[32, 32, 32, 32])),
    "sd35-large": ("sd3", "SD3", dict(_SD3, depth=38, num_patches=36864, pos_embed_max_size=192,
                                      context_embedder_config={"target": "torch.nn.Linear",
                                                               "params": {"in_features": 4096, "out_features": 2432}},
                                      x_block_self_attn_layers=[])),
    "sd35-medium": ("sd3", "SD3", dict(_SD3, depth=24, num_patches=147456, pos_embed_max_size=384,
                                       context_embedder_config={"target": "torch.nn.Linear",
                                                                "params": {"in_features": 4096, "out_features": 1536}},
                                       x_block_self_attn_layers=list(range(13)))),
    "qwen-image": ("qwen_image", "QwenImage", {"image_model": "qwen_image", "in_channels": 64, "num_layers": 60}),
    "z-image": ("z_image", "ZImage", dict(_ZIMAGE, dim=3840, n_layers=30, n_heads=30, n_kv_heads=30,
                                          axes_dims=[32, 48, 48], axes_lens=[1536, 512, 512],
                                          ffn_dim_multiplier=8.0 / 3.0)),
    "wan21-14b-i2v": ("wan", "WAN21_I2V", dict(_WAN, dim=5120, out_dim=16, num_heads=40, ffn_dim=13824, num_layers=40,
                                               in_dim=36, model_type="i2v")),
    "wan21-1.3b": ("wan", "WAN21_T2V", dict(_WAN, dim=1536, out_dim=16, num_heads=12, ffn_dim=8960, num_layers=30,
                                            in_dim=16, model_type="t2v")),
    "wan22-5b": ("wan", "WAN22_T2V", dict(_WAN, dim=3072, out_dim=48, num_heads=24, ffn_dim=14336, num_layers=30,
                                          in_dim=48, model_type="t2v")),
}

# family id → (supported_models class, unet config) of a tiny model with the family's module names
TINY = {
    "sd15": ("SD15", dict(FULL["sd15"][2], model_channels=32, num_head_channels=16, num_heads=-1,
                          channel_mult=[1, 2, 2, 2])),
    "sd2": ("SD20", dict(FULL["sd2"][2], model_channels=64, channel_mult=[1, 1, 2, 2])),  # heads of 64 channels
    "flux1": ("Flux", dict(_FLUX1, hidden_size=64, num_heads=2, depth=2, depth_single_blocks=2, vec_in_dim=32,
                           context_in_dim=48, axes_dim=[8, 12, 12])),
    "flux2": ("Flux2", dict(_FLUX2, hidden_size=64, num_heads=2, depth=2, depth_single_blocks=2, context_in_dim=48,
                            axes_dim=[8, 8, 8, 8])),
    "sd3": ("SD3", dict(_SD3, depth=2, num_patches=256, pos_embed_max_size=16,
                        context_embedder_config={"target": "torch.nn.Linear",
                                                 "params": {"in_features": 48, "out_features": 128}},
                        x_block_self_attn_layers=[0], adm_in_channels=32)),
    "qwen_image": ("QwenImage", {"image_model": "qwen_image", "in_channels": 16, "num_layers": 2, "attention_head_dim": 16,
                                 "num_attention_heads": 4, "joint_attention_dim": 48, "out_channels": 4}),
    "z_image": ("ZImage", dict(_ZIMAGE, dim=64, n_layers=2, n_heads=2, n_kv_heads=2, axes_dims=[8, 12, 12],
                               axes_lens=[64, 32, 32], ffn_dim_multiplier=8.0 / 3.0, cap_feat_dim=48,
                               n_refiner_layers=1)),
    "wan": ("WAN21_T2V", dict(_WAN, dim=64, out_dim=4, num_heads=2, ffn_dim=96, num_layers=2, in_dim=4,
                              model_type="t2v", text_dim=48)),
}


def import_comfy():
    """ComfyUI's modules (COMFYUI_PATH on sys.path, CPU mode)."""
    root = os.environ.get("COMFYUI_PATH") or os.environ.get("LORARAR_CONTRACT_COMFYUI")
    if root and root not in sys.path:
        sys.path.append(root)
    import comfy.cli_args

    comfy.cli_args.args.cpu = True
    import comfy.lora
    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models

    return comfy


def build(comfy, config_class: str, unet_config: dict, device: str = "meta"):
    """A ComfyUI model (BaseModel subclass) of a family; on "meta" it holds no memory."""
    import torch

    unet_config = dict(unet_config)
    while True:
        config = getattr(comfy.supported_models, config_class)(dict(unet_config))
        if hasattr(config, "set_inference_dtype"):
            config.set_inference_dtype(torch.float32 if device != "meta" else torch.bfloat16, None)
        try:
            if device == "meta":
                with torch.device("meta"):
                    return config.get_model({}, device=torch.device("meta"))
            return config.get_model({}, device=torch.device(device))
        except TypeError as exc:  # an older ComfyUI without a setting of the newest (Flux's txt_ids_dims)
            unknown = re.search(r"unexpected keyword argument '(\w+)'", str(exc))
            if unknown is None or unknown.group(1) not in unet_config:
                raise
            del unet_config[unknown.group(1)]


def weights_of(model) -> dict[str, tuple[int, ...]]:
    """Every weight (ndim ≥ 2) of a model's diffusion model, by canonical name."""
    return {k[: -len(".weight")]: tuple(v.shape) for k, v in model.diffusion_model.state_dict().items()
            if k.endswith(".weight") and v.dim() >= 2}


def golden(comfy, variant: str) -> dict:
    family, config_class, unet_config = FULL[variant]
    model = build(comfy, config_class, unet_config)
    return {"family": family, "variant": variant,
            "source": f"ComfyUI {_version(comfy)}: comfy.supported_models.{config_class}, built on the meta device",
            "parameters": sum(v.numel() for v in model.diffusion_model.state_dict().values()),
            "weights": [[name, list(shape)] for name, shape in weights_of(model).items()]}


def _version(comfy) -> str:
    try:
        import comfyui_version

        return comfyui_version.__version__
    except ImportError:
        return "(version unknown)"


def write_golden(document: dict) -> Path:
    path = GOLDEN / f"{document['variant']}.json"
    head = {k: v for k, v in document.items() if k != "weights"}
    lines = [json.dumps(head)[:-1] + ', "weights": [']
    lines += [("  " if i == 0 else " ,") + json.dumps(w) for i, w in enumerate(document["weights"])]
    path.write_text("\n".join(lines) + "\n]}\n", encoding="utf-8")
    return path


if __name__ == "__main__":
    comfy = import_comfy()
    for variant in FULL:
        print(write_golden(golden(comfy, variant)))
