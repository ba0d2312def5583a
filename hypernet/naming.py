"""Layer names, the same for every family: what a canonical name is, how it is written as a kohya
key, which transformer block it belongs to — each answered by the family's data
(hypernet/families), not by code that knows a family.

Canonical layer names:
- model layers: the weight's module path inside ComfyUI's `diffusion_model`, dotted — for the UNets
  the LDM name `input_blocks.4.1.transformer_blocks.0.attn1.to_q` (what kohya writes too), for
  Flux `double_blocks.0.img_attn.qkv`, for Qwen-Image `transformer_blocks.0.attn.to_q`, …;
- text-encoder layers: `te<N>.` + the HF module path inside that encoder, e.g.
  `te1.text_model.encoder.layers.0.self_attn.q_proj` (N as kohya numbers the family's encoders).

The SDXL helpers at the end (`sdxl_linear_layers`, `diffusers_to_ldm`, …) are the SDXL family's
data under the names the rest of the pack and its tests have always used.
"""

from __future__ import annotations

import functools
import re

from . import families
from .families import unet as unet_layout
from .families.keys import unflatten

_TEXT_ENCODER = re.compile(r"^te\d\.")
TEXT_ENCODER_PREFIXES = ("te1.", "te2.", "te3.")


def flatten(dotted: str) -> str:
    return dotted.replace(".", "_")


def is_text_encoder(name: str) -> bool:
    return _TEXT_ENCODER.match(name) is not None


def kohya_key(name: str, family: str | None = None) -> str:
    """Canonical layer name → the module key a merged file writes (without `.lora_up.weight`):
    `lora_unet_<name with _>` and the family's text-encoder prefixes (SD1.5/SD2 `lora_te_`,
    SDXL `lora_te1_`/`lora_te2_`, …) — forms ComfyUI's loader maps for every family."""
    return families.get(family or "sdxl").kohya_key(name)


def ldm_to_kohya_key(name: str, family: str | None = None) -> str:
    """`kohya_key` under its historical name (SDXL's prefixes unless `family` says otherwise)."""
    return kohya_key(name, family)


def text_encoder_canonical(encoder: str, path: str) -> str:
    """`te1`/`te2` + an HF module path inside that CLIP, with or without `text_model.` → the
    canonical name `te1.text_model.encoder.layers.N…` (transformers 5 flattened CLIPTextModel:
    both spellings mean the same layer)."""
    if path.startswith(("encoder.", "embeddings.", "final_layer_norm")):
        path = f"text_model.{path}"
    return f"{encoder}.{path}"


@functools.lru_cache(maxsize=1 << 14)
def _block(name: str) -> tuple[tuple, str] | None:
    # the families' block names are disjoint (input_blocks.4.1, double_blocks.3, joint_blocks.2,
    # transformer_blocks.5, layers.1, blocks.7, …), so the first family that knows a name owns it
    for spec in families.all_families():
        found = spec.block_of(name)
        if found is not None:
            return found
    return None


def transformer_block_of(name: str) -> str | None:
    """The transformer block a layer belongs to (`input_blocks.4.1`, `double_blocks.3`, …), or
    None (text encoders, ResBlocks, embeddings)."""
    found = _block(name)
    return found[1] if found else None


def unet_block_order_key(block: str) -> tuple:
    """Sort key putting a family's blocks in model order (UNet: input, middle, output blocks;
    Flux: double, then single blocks; …)."""
    found = _block(block + ".x")
    if found is None:
        raise ValueError(f"{block!r} is not a transformer block of any known family")
    return found[0]


block_order_key = unet_block_order_key


def is_unet_block(block: str) -> bool:
    """A UNet's Transformer2D block (which holds `transformer_blocks.N` inside), as opposed to one
    transformer block of a DiT."""
    return unet_layout.transformer_block_of(block + ".x") == block


def block_label(block: str) -> str:
    """`input_blocks.4.1` → `in 4`, `middle_block.1` → `mid`, `double_blocks.3` → `double 3`, …"""
    for spec in families.all_families():
        label = spec.block_label(block)
        if label is not None:
            return label
    return block


# ---------------------------------------------------------------------------------------------
# SDXL, as the rest of the pack has always named it (its data is in families/data/sdxl.json).

ATTENTION_PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")


def _sdxl():
    return families.get("sdxl")


def _sdxl_blocks() -> tuple[tuple[str, int, int], ...]:
    unet = _sdxl().unet
    return tuple((ldm, width, depth) for ldm, _, kind, _, width, depth in unet_layout._blocks(unet)
                 if kind == "attention")


# (LDM block prefix, width, transformer depth) of SDXL's 11 transformer blocks
SDXL_TRANSFORMER_BLOCKS = _sdxl_blocks()
SDXL_CONTEXT_DIM = _sdxl().unet["context_dim"]


def transformer_linear_layers(family: str) -> dict[str, tuple[int, int]]:
    """Every Linear layer of a UNet family's transformer blocks (kohya's default LoRA targets):
    LDM name → (out_features, in_features)."""
    table = families.get(family).table()
    return {name: shape for name, shape in table.items()
            if len(shape) == 2 and (".transformer_blocks." in name or name.endswith((".proj_in", ".proj_out")))}


def sdxl_linear_layers() -> dict[str, tuple[int, int]]:
    """The 722 Linear layers of SDXL's transformer blocks: LDM name → (out_features, in_features)."""
    return dict(transformer_linear_layers("sdxl"))


def diffusers_to_ldm(path: str, family: str = "sdxl") -> str:
    """Diffusers UNet module path → LDM name, for a UNet family (SDXL's block layout by default);
    a path the family does not map comes back unchanged (the caller checks validity)."""
    vocabulary = families.get(family).vocabularies["diffusers"]
    for mapping in vocabulary.lookup(path):
        match = mapping.regex.match(path)
        if match:
            return mapping.target.format(**match.groupdict())
    return path


def ldm_to_diffusers(name: str, family: str = "sdxl") -> str:
    """LDM name → diffusers UNet path (the inverse of diffusers_to_ldm; used to write test LoRAs
    and to find modules in diffusers UNets)."""
    path = unet_layout.diffusers_name(families.get(family).unet, name)
    if path is None:
        raise ValueError(f"{name} is not a layer of the {families.name_of(family)} UNet")
    return path


def kohya_unet_to_ldm(flat: str, family: str = "sdxl") -> str:
    """The part after `lora_unet_`, in either LDM or diffusers block naming, as an LDM name."""
    spec = families.get(family)
    ldm = unflatten(flat, spec.vocabularies["model"].words)
    if spec.is_valid_model_name(ldm):
        return ldm
    return diffusers_to_ldm(unflatten(flat, spec.vocabularies["diffusers"].words), family)
