"""How a merge reaches ComfyUI's MODEL and CLIP: one patch per merged weight.

Two stacked LoRA loaders give each weight two patches; ComfyUI then computes, per weight and per
patch, `up @ down`, scales that out×in product and adds it (four passes over the weight besides
the two products). A merged layer here is one patch (`MergedLayerPatch`, a ComfyUI weight
adapter) that builds the concatenated rank-(r_c + r_s) factors on the weight's own device when
ComfyUI patches — strengths, scales and the method's column coefficients all inside the small
factors (`hypernet.merged.patch_factors`) — and adds their product: the same multiply-adds as the
two LoRA products, no extra pass over the weight, and nothing concatenated in CPU memory at node
time.

The adapter keeps ComfyUI's weight-adapter contract of 2026 (dynamic VRAM, ComfyUI ≥ 0.15):
`comfy.lora.prefetch_prepared_value` rebuilds an adapter as `type(a)(a.loaded_keys, <a.weights
copied into one VRAM buffer>)`, so the constructor is exactly `(loaded_keys, weights)`, every tensor
the maths needs is inside `weights` (a tuple of per-side tuples, which that copy walks; a factor
held as pieces of a fused weight is `packed` into tuples of its tensors so the copy moves them too),
and nothing is read in `__init__`. ComfyUI's low-VRAM path calls it with `intermediate_dtype` = the weight's
fp16/bf16 dtype and no original weight; the maths runs in float32 anyway and the result is cast back
to the weight's dtype once.

Layers without a low-rank form (LoHa, LoKr, DoRA, full diffs) keep the per-side patches; so does
every layer on a ComfyUI without weight adapters (2024), where `patch_class` is None and the node
uses the per-side plan for everything (logged once).
"""

from __future__ import annotations

import functools
import logging

import torch

from ..hypernet import naming
from ..hypernet.merged import add_merged_delta
from ..hypernet.row_blocks import packed, unpacked

log = logging.getLogger(__name__)


def _adapter_base():
    try:
        from comfy.weight_adapter.base import WeightAdapterBase
    except ImportError:  # ComfyUI before weight adapters: the caller falls back to per-side patches
        return None
    return WeightAdapterBase


@functools.cache
def patch_class():
    """The weight-adapter class (built once: it subclasses ComfyUI's base), or None without one."""
    base = _adapter_base()
    if base is None:
        log.info("LoRA.rar Merge: this ComfyUI has no weight adapters (it predates 2025); merged layers "
                 "are patched per side, as two stacked LoRA loaders would")
        return None

    class MergedLayerPatch(base):
        """ComfyUI weight adapter for one merged layer (see the module docstring).
        `weights`: per side with a non-zero factor, (up, down, columns or None, scale · strength),
        up and down `packed` (a fused weight's pieces as tuples of tensors the prefetch copies)."""

        name = "lorarar_merged_layer"

        def __init__(self, loaded_keys, weights):
            self.loaded_keys = loaded_keys
            self.weights = weights

        def calculate_shape(self, key):
            return None  # a merge never changes the shape of the weight it patches

        def calculate_weight(self, weight, key, strength, strength_model, offset, function,
                             intermediate_dtype=torch.float32, original_weight=None):
            # float32 whatever `intermediate_dtype` says (the low-VRAM path passes fp16/bf16)
            sides = tuple((unpacked(up), unpacked(down), columns, factor) for up, down, columns, factor in self.weights)
            return add_merged_delta(weight, sides, strength, function)

    return MergedLayerPatch


def patch_models(model, clip, merged, side_plan):
    """(model, clip) with `merged` applied, one patch per low-rank layer; the other layers through
    `side_plan(layer names)` → [(kohya dict, strength)] as before. None where this ComfyUI has no
    weight adapters."""
    import comfy.lora
    import comfy.sd

    cls = patch_class()
    if cls is None:
        return None
    key_map: dict = {}
    if model is not None:
        key_map = comfy.lora.model_lora_keys_unet(model.model, key_map)
    if clip is not None:
        key_map = comfy.lora.model_lora_keys_clip(clip.cond_stage_model, key_map)
    patches, rest, missing = {}, [], []
    for name, layer in merged.layers.items():
        if naming.is_text_encoder(name) and clip is None:
            continue
        if not layer.is_low_rank:
            rest.append(name)
            continue
        kohya = naming.kohya_key(name, merged.family)
        target = key_map.get(kohya)
        if target is None:
            missing.append(name)
            continue
        sides = merged.layer_patch(name)
        if sides is not None:
            patches[target] = cls({kohya}, tuple((packed(up), packed(down), columns, factor)
                                                 for up, down, columns, factor in sides))
    if missing:  # as core's loader says for keys the model lacks
        log.warning("LoRA.rar Merge: %d merged layer(s) have no weight in this model, e.g. %s", len(missing), missing[0])
    new_model = model.clone() if model is not None else None
    new_clip = clip.clone() if clip is not None else None
    if new_model is not None:
        new_model.add_patches(patches, 1.0)
    if new_clip is not None:
        new_clip.add_patches(patches, 1.0)
    for state_dict, strength in side_plan(rest) if rest else []:
        new_model, new_clip = comfy.sd.load_lora_for_models(new_model, new_clip, state_dict, strength, strength)
    return new_model, new_clip


def model_family(model) -> str | None:
    """The family (hypernet/families) of a ComfyUI MODEL, by its model-config class; None if
    unknown or no model."""
    from ..hypernet import families

    config = getattr(getattr(model, "model", None), "model_config", None)
    return families.for_comfy_model(type(config).__name__) if config is not None else None


def _text_encoders_without_clip(merged, model, clip) -> None:
    """Text-encoder layers need a CLIP: an error where they are all the merge has, a line on the
    node where the model part is applied without them."""
    from ..hypernet.errors import LoraRarError

    text = [n for n in merged.layers if naming.is_text_encoder(n)]
    if not text or clip is not None:
        return
    if len(text) == len(merged.layers):
        raise LoraRarError(f"clip: the two LoRAs have only text-encoder layers ({len(text)}, e.g. {text[0]}), which "
                           "patch a CLIP; connect the CLIP input (or load the LoRAs into your CLIP with core's LoRA nodes)")
    if model is not None:
        alert = (f"{len(text)} text-encoder layer(s) of the LoRAs were NOT applied: no CLIP connected (connect "
                 "the CLIP input to apply them)")
        merged.report.notes.append(alert)
        merged.report.alerts.append(alert)


def apply_merged(model, clip, merged):
    """(model, clip) with a merge applied — the one patching path of every node that merges
    (LoRA.rar Merge, ZipLoRA Merge). Either input may be None (then None comes back for it); text-
    encoder layers are applied only with a clip. Nothing to apply (no layers, or both strengths 0):
    the inputs come back unchanged. A merge that switches LoRAs during sampling (k-lora) gets its
    static layers patched here and a scheduled clone for the rest (`k_lora_patching`)."""
    import comfy.sd

    from ..hypernet.nodelogic import merge as merge_logic
    from .k_lora_patching import scheduled_model

    active = bool(merged.layers) and (merged.content_strength != 0 or merged.style_strength != 0)
    if not active or (model is None and clip is None):
        return model, clip
    _text_encoders_without_clip(merged, model, clip)
    include_text_encoders = clip is not None
    if merged.switch_points:
        switching = merge_logic.switch_plan(merged, include_text_encoders)
        new_model, new_clip = model, clip
        for state_dict, strength in switching.static:
            new_model, new_clip = comfy.sd.load_lora_for_models(new_model, new_clip, state_dict, strength, strength)
        if switching.points and new_model is not None:
            new_model = scheduled_model(new_model, switching)
        return new_model, new_clip
    # one patch per merged weight where this ComfyUI supports it; otherwise each side as its own LoRA
    patched = patch_models(model, clip, merged,
                           lambda names: merge_logic.patch_plan_of(merged, names, include_text_encoders))
    if patched is not None:
        return patched
    new_model, new_clip = model, clip
    for state_dict, strength in merge_logic.patch_plan(merged, include_text_encoders):
        new_model, new_clip = comfy.sd.load_lora_for_models(new_model, new_clip, state_dict, strength, strength)
    return new_model, new_clip
