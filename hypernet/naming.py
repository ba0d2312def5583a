"""Layer names: SDXL's LDM module names, and the conversions from every naming family to them.

Canonical layer names in this package:
- UNet layers: the LDM module path inside `diffusion_model`, dotted, e.g.
  `input_blocks.4.1.transformer_blocks.0.attn1.to_q` (what ComfyUI and kohya use).
- Text-encoder layers: `te1.` (CLIP-L) or `te2.` (CLIP-G) + the HF module path, e.g.
  `te1.text_model.encoder.layers.0.self_attn.q_proj`.

kohya flattens module paths with underscores, which is ambiguous (`to_q`, `transformer_blocks`).
We undo it with a vocabulary of multi-word tokens: the known underscore words are protected,
every other underscore becomes a dot.
"""

from __future__ import annotations

import functools
import re

TEXT_ENCODER_PREFIXES = ("te1.", "te2.")

# Multi-word tokens that contain an underscore, longest first so `to_out` wins over `to`.
_LDM_WORDS = (
    "transformer_blocks", "input_blocks", "output_blocks", "middle_block", "skip_connection",
    "emb_layers", "in_layers", "out_layers", "time_embed", "label_emb", "proj_in", "proj_out",
    "to_out", "to_q", "to_k", "to_v",
)
_DIFFUSERS_WORDS = (
    "transformer_blocks", "down_blocks", "up_blocks", "mid_block", "downsamplers", "upsamplers",
    "conv_shortcut", "time_emb_proj", "time_embedding", "add_embedding", "conv_in", "conv_out",
    "conv_norm_out", "linear_1", "linear_2", "proj_in", "proj_out", "to_out", "to_q", "to_k", "to_v",
)
_TEXT_WORDS = (
    "text_model", "self_attn", "q_proj", "k_proj", "v_proj", "out_proj", "text_projection",
    "final_layer_norm", "position_embedding", "token_embedding",
)


@functools.lru_cache(maxsize=None)
def _word_pattern(words: tuple[str, ...]) -> re.Pattern:
    # A word counts only between underscores (or the ends); alternatives are tried longest first.
    alternatives = "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))
    return re.compile(rf"(?:(?<=_)|^)({alternatives})(?=_|$)")


@functools.lru_cache(maxsize=4096)
def _unflatten(flat: str, words: tuple[str, ...]) -> str:
    """`input_blocks_4_1_transformer_blocks_0_attn1_to_q` → `input_blocks.4.1.transformer_blocks.0.attn1.to_q`."""
    pieces = _word_pattern(words).split(flat)
    # split() with one group alternates: plain text, protected word, plain text, …
    return "".join(piece if i % 2 else piece.replace("_", ".") for i, piece in enumerate(pieces))


def flatten(dotted: str) -> str:
    return dotted.replace(".", "_")


def kohya_unet_to_ldm(flat: str) -> str:
    """The part after `lora_unet_`, in either LDM or diffusers block naming, as an LDM name."""
    if flat.startswith(("down_blocks", "up_blocks", "mid_block", "conv_in", "conv_out",
                        "time_embedding", "add_embedding")):
        return diffusers_to_ldm(_unflatten(flat, _DIFFUSERS_WORDS))
    return _unflatten(flat, _LDM_WORDS)


def kohya_text_to_canonical(encoder: str, flat: str) -> str:
    return text_encoder_canonical(encoder, _unflatten(flat, _TEXT_WORDS))


# Top-level modules of a CLIP text transformer. transformers 5 flattened `CLIPTextModel` (CLIP-L):
# these sit directly on the model, no `text_model.` in between, so diffusers now writes
# `text_encoder.encoder.layers.N…` and its kohya exporter `lora_te1_encoder_layers_N_…`.
# `CLIPTextModelWithProjection` (CLIP-G) still wraps them in `text_model.`.
_CLIP_TRANSFORMER_PARTS = ("encoder.", "embeddings.", "final_layer_norm")


def text_encoder_canonical(encoder: str, path: str) -> str:
    """`te1`/`te2` + an HF module path inside that text encoder, with or without `text_model.`
    → the canonical name `te1.text_model.encoder.layers.N…` (both spellings mean the same layer)."""
    if path.startswith(_CLIP_TRANSFORMER_PARTS):
        path = f"text_model.{path}"
    return f"{encoder}.{path}"


_RESNET_LAYERS = {"conv1": "in_layers.2", "conv2": "out_layers.3",
                  "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}
# Up-blocks that carry attentions in SDXL; their upsampler sits after the attention (`.2.conv`).
_SDXL_UP_BLOCKS_WITH_ATTENTION = (0, 1)
_FIXED = {
    "conv_in": "input_blocks.0.0", "conv_out": "out.2",
    "time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
}


def diffusers_to_ldm(path: str) -> str:
    """Diffusers UNet module path → LDM path (SDXL block layout).

    Transformer internals (`transformer_blocks.0.attn1.to_q`, `proj_in`, `ff.net.2`) are named
    the same in both; only the block prefix and the ResBlock layers change.
    """
    if path in _FIXED:
        return _FIXED[path]
    m = re.match(r"(down_blocks|up_blocks)\.(\d+)\.(attentions|resnets)\.(\d+)\.(.+)$", path)
    if m:
        side, i, part, j, rest = m.group(1), int(m.group(2)), m.group(3), int(m.group(4)), m.group(5)
        block = f"{'input_blocks' if side == 'down_blocks' else 'output_blocks'}.{3 * i + j + (side == 'down_blocks')}"
        if part == "attentions":
            return f"{block}.1.{rest}"
        return f"{block}.0.{_RESNET_LAYERS.get(rest, rest)}"
    m = re.match(r"mid_block\.(attentions|resnets)\.(\d+)\.(.+)$", path)
    if m:
        part, j, rest = m.groups()
        if part == "attentions":
            return f"middle_block.1.{rest}"
        return f"middle_block.{2 * int(j)}.{_RESNET_LAYERS.get(rest, rest)}"
    m = re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv$", path)
    if m:
        return f"input_blocks.{3 * (int(m.group(1)) + 1)}.0.op"
    m = re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv$", path)
    if m:
        i = int(m.group(1))
        return f"output_blocks.{3 * i + 2}.{2 if i in _SDXL_UP_BLOCKS_WITH_ATTENTION else 1}.conv"
    return path  # not a diffusers UNet path we know; the caller checks validity


def ldm_to_kohya_key(name: str) -> str:
    """Canonical layer name → kohya module key (without `.lora_up.weight`)."""
    for index, prefix in enumerate(TEXT_ENCODER_PREFIXES, start=1):
        if name.startswith(prefix):
            return f"lora_te{index}_{flatten(name[len(prefix):])}"
    return f"lora_unet_{flatten(name)}"


def is_text_encoder(name: str) -> bool:
    return name.startswith(TEXT_ENCODER_PREFIXES)


# ---------------------------------------------------------------------------------------------
# SDXL's transformer layout: the 722 Linear layers kohya's default SDXL LoRA touches.

# (LDM block prefix, width, transformer depth)
SDXL_TRANSFORMER_BLOCKS = (
    ("input_blocks.4.1", 640, 2), ("input_blocks.5.1", 640, 2),
    ("input_blocks.7.1", 1280, 10), ("input_blocks.8.1", 1280, 10),
    ("middle_block.1", 1280, 10),
    ("output_blocks.0.1", 1280, 10), ("output_blocks.1.1", 1280, 10), ("output_blocks.2.1", 1280, 10),
    ("output_blocks.3.1", 640, 2), ("output_blocks.4.1", 640, 2), ("output_blocks.5.1", 640, 2),
)
SDXL_CONTEXT_DIM = 2048
ATTENTION_PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")


def sdxl_linear_layers() -> dict[str, tuple[int, int]]:
    """Every Linear layer in SDXL's transformer blocks: LDM name → (out_features, in_features)."""
    layers: dict[str, tuple[int, int]] = {}
    for block, width, depth in SDXL_TRANSFORMER_BLOCKS:
        layers[f"{block}.proj_in"] = (width, width)
        for d in range(depth):
            prefix = f"{block}.transformer_blocks.{d}"
            for attn in ("attn1", "attn2"):
                for proj in ATTENTION_PROJECTIONS:
                    context = attn == "attn2" and proj in ("to_k", "to_v")
                    layers[f"{prefix}.{attn}.{proj}"] = (width, SDXL_CONTEXT_DIM if context else width)
            layers[f"{prefix}.ff.net.0.proj"] = (width * 8, width)  # GEGLU: 2 × 4·width
            layers[f"{prefix}.ff.net.2"] = (width, width * 4)
        layers[f"{block}.proj_out"] = (width, width)
    return layers


def transformer_block_of(name: str) -> str | None:
    """`input_blocks.4.1.transformer_blocks.0.attn1.to_q` → `input_blocks.4.1`, else None."""
    m = re.match(r"((?:input_blocks|output_blocks)\.\d+\.1|middle_block\.1)\.", name)
    return m.group(1) if m else None


def unet_block_order_key(block: str) -> tuple[int, int]:
    """Sort key putting blocks in UNet order: input blocks, middle, output blocks."""
    kind, index = block.split(".")[:2]
    return ({"input_blocks": 0, "middle_block": 1, "output_blocks": 2}[kind], int(index))


def ldm_to_diffusers(name: str) -> str:
    """LDM name of a transformer-block layer → diffusers UNet path (inverse of diffusers_to_ldm
    for the attention blocks; used to write test LoRAs and to find modules in diffusers UNets)."""
    m = re.match(r"(input_blocks|output_blocks)\.(\d+)\.1\.(.+)$", name)
    if m:
        side, n, rest = m.group(1), int(m.group(2)), m.group(3)
        if side == "input_blocks":
            return f"down_blocks.{(n - 1) // 3}.attentions.{(n - 1) % 3}.{rest}"
        return f"up_blocks.{n // 3}.attentions.{n % 3}.{rest}"
    if name.startswith("middle_block.1."):
        return f"mid_block.attentions.0.{name[len('middle_block.1.'):]}"
    raise ValueError(f"{name} is not a transformer-block layer")
