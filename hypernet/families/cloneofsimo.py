"""cloneofsimo's `lora` package files (the first LoRA trainer for Stable Diffusion, 2022-23): keys
`unet:N:up` / `unet:N:down` and `text_encoder:N:…`, where N is the module's *position* in the order
the package found the modules it injected, and the rank of each in the header (`unet:N:rank`).

That order is the models' own registration order, so it can be rebuilt — and checked by shapes:

- UNet (targets CrossAttention/Attention/GEGLU): `model.modules()` visits diffusers' down blocks,
  then the up blocks, then the mid block (UNet2DConditionModel assigns `up_blocks` before
  `mid_block`), and in each transformer block the Linear children of its attention and GEGLU
  modules: attn1 q, k, v, out; the GEGLU projection; attn2 q, k, v, out (diffusers ≤ 0.11 registered
  `ff` before `attn2`; later versions after it, which the shapes tell apart: the GEGLU projection is
  8× the block's width).
- Text encoder (target CLIPAttention): per CLIP layer k, v, q, out — transformers registers
  CLIPAttention's projections in that order. This is the one part the shapes cannot confirm (all
  four are square); it is the registration order of every transformers version that had these
  files.

Every module's shape is checked against the position it is given; a file whose modules do not fit
(another target set, another base model) is refused with one error, never read by guesswork.
The result is ordinary diffusers-named keys (`unet.….to_q.lora.up.weight`), read like any other file.
"""

from __future__ import annotations

import re

import torch

from ..errors import LoraFormatError
from . import get
from .unet import _blocks

_KEY = re.compile(r"^(unet|text_encoder):(\d+):(up|down)$")
_ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")
_CLIP = ("k_proj", "v_proj", "q_proj", "out_proj")
FAMILIES = ("sd15", "sd2")  # the package trained SD1.x/SD2.x only


def is_cloneofsimo(keys) -> bool:
    return any(isinstance(k, str) and _KEY.match(k) for k in keys)


def _unet_modules(unet: dict, geglu_first: bool) -> list[str]:
    blocks = [(ldm, diffusers, depth) for ldm, diffusers, kind, _, _, depth in _blocks(unet) if kind == "attention"]
    ordered = ([b for b in blocks if b[1].startswith("down_blocks")] + [b for b in blocks if b[1].startswith("up_blocks")]
               + [b for b in blocks if b[1].startswith("mid_block")])
    paths = []
    for _, diffusers, depth in ordered:
        for d in range(depth):
            block = f"{diffusers}.transformer_blocks.{d}"
            attn1 = [f"{block}.attn1.{p}" for p in _ATTENTION]
            attn2 = [f"{block}.attn2.{p}" for p in _ATTENTION]
            ff = [f"{block}.ff.net.0.proj"]
            paths += attn1 + ff + attn2 if geglu_first else attn1 + attn2 + ff
    return paths


def convert(state_dict: dict, metadata: dict, source: str) -> tuple[dict, list[str], list[str]]:
    """(diffusers-named state dict, the original keys it came from, notes)."""
    unet = {}
    text = {}
    for key, tensor in state_dict.items():
        match = _KEY.match(key) if isinstance(key, str) else None
        if match:
            (unet if match.group(1) == "unet" else text).setdefault(int(match.group(2)), {})[match.group(3)] = tensor
    for part, modules in (("unet", unet), ("text_encoder", text)):
        for index, tensors in modules.items():
            if set(tensors) != {"up", "down"} or tensors["up"].dim() != 2 or tensors["down"].dim() != 2:
                raise LoraFormatError(f"{source}: cloneofsimo `lora` file: module {part}:{index} needs a 2-D up and "
                                      f"down, found {sorted(tensors)}")
    shapes = {i: (t["up"].shape[0], t["down"].shape[1]) for i, t in unet.items()}
    family, paths = _match_unet(shapes)
    if family is None:
        raise LoraFormatError(
            f"{source}: a cloneofsimo `lora` file (keys unet:N:up/down by position) whose {len(unet)} UNet modules do "
            "not fit, position by position, the attention layers of SD1.5 or SD2 in the package's default order "
            "(attention and GEGLU projections); files trained with other targets cannot be read safely")
    spec = get(family)
    out: dict[str, torch.Tensor] = {}
    for index, tensors in unet.items():
        out[f"unet.{paths[index]}.lora.up.weight"] = tensors["up"]
        out[f"unet.{paths[index]}.lora.down.weight"] = tensors["down"]
    width = spec.encoders["te1"].width
    layers = spec.encoders["te1"].layers
    for index, tensors in text.items():
        layer, projection = divmod(index, len(_CLIP))
        if layer >= layers or tensors["up"].shape[0] != width or tensors["down"].shape[1] != width:
            raise LoraFormatError(f"{source}: cloneofsimo `lora` file: text-encoder module {index} "
                                  f"{tuple(tensors['up'].shape)}/{tuple(tensors['down'].shape)} does not fit "
                                  f"{spec.name}'s {spec.encoders['te1'].name} ({layers} layers × 4 {width}-wide projections)")
        path = f"text_model.encoder.layers.{layer}.self_attn.{_CLIP[projection]}"
        out[f"text_encoder.{path}.lora_linear_layer.up.weight"] = tensors["up"]
        out[f"text_encoder.{path}.lora_linear_layer.down.weight"] = tensors["down"]
    converted = [k for k in state_dict if isinstance(k, str) and _KEY.match(k)]
    notes = [f"cloneofsimo `lora` file ({spec.name}): {len(unet)} UNet and {len(text)} text-encoder modules identified "
             "by position and shape (text encoder: k, v, q, out per layer, transformers' order); scale 1"]
    ranks = {k: v for k, v in metadata.items() if k.endswith(":rank")}
    wrong = [k for k, v in ranks.items() if _rank_of(k, unet, text) not in (None, _int(v))]
    if wrong:
        notes.append(f"{len(wrong)} module(s) have another rank in the header than in their factors (e.g. {wrong[0]}); "
                     "the factors' rank is used")
    return out, converted, notes


def _int(text: str) -> int | None:
    try:
        return int(text)
    except (TypeError, ValueError):
        return None


def _rank_of(key: str, unet: dict, text: dict) -> int | None:
    part, index, _ = key.split(":")
    modules = unet if part == "unet" else text
    tensors = modules.get(_int(index))
    return tensors["down"].shape[0] if tensors else None


def _match_unet(shapes: dict[int, tuple[int, int]]):
    """(family, module paths by position) whose expected shapes equal the file's, or (None, None)."""
    for family in FAMILIES:
        spec = get(family)
        table = spec.table()
        for geglu_first in (True, False):
            paths = _unet_modules(spec.unet, geglu_first)
            if set(shapes) != set(range(len(paths))):
                continue
            vocabulary = spec.vocabularies["diffusers"]
            ok = True
            for index, path in enumerate(paths):
                name = next((m.target.format(**m.regex.match(path).groupdict()) for m in vocabulary.lookup(path)
                             if m.regex.match(path)), None)
                expected = table.get(name)
                if expected is None or (expected[0], expected[1]) != shapes[index]:
                    ok = False
                    break
            if ok:
                return family, paths
    return None, None
