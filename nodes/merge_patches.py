"""One ComfyUI patch per merged weight (issue 12 §3).

Two stacked LoRA loaders give each weight two patches; ComfyUI then computes, per weight and per
patch, `up @ down`, scales that out×in product and adds it (four passes over the weight besides
the two products). A merged layer here is one patch (`MergedLayerPatch`, a ComfyUI weight
adapter) that builds the concatenated rank-(r_c + r_s) factors on the weight's own device when
ComfyUI patches — strengths, scales and the method's column coefficients all inside the small
factors (`MergedLora.layer_factors`) — and adds their product in one `addmm_`: the same
multiply-adds as the two LoRA products, no extra pass over the weight, and nothing concatenated
in CPU memory at node time.

Layers without a low-rank form (LoHa, LoKr, DoRA, full diffs) keep the per-side patches; so does
every layer on a ComfyUI without weight adapters (older than 2025), where `patch_models` returns
None and the node uses the per-side plan for everything.
"""

from __future__ import annotations

import functools
import logging

import torch

from ..hypernet import naming

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
        return None

    class MergedLayerPatch(base):
        """ComfyUI weight adapter for one merged layer (see the module docstring)."""

        name = "lorarar_merged_layer"

        def __init__(self, merged, layer_name: str):
            self.merged, self.layer_name = merged, layer_name
            self.loaded_keys: set[str] = set()
            self.weights: list[torch.Tensor] = []

        def calculate_weight(self, weight, key, strength, strength_model, offset, function,
                             intermediate_dtype=torch.float32, original_weight=None):
            factors = self.merged.layer_factors(self.layer_name, weight.device, intermediate_dtype)
            if factors is None or strength == 0:
                return weight
            up, down = factors
            if strength != 1.0:
                up = up * strength
            # ComfyUI passes the identity when no patch function was set (its own patches then
            # add the plain product): it returns its argument itself, which a real function does not.
            probe = weight.new_empty(0)
            identity = function(probe) is probe
            if identity and weight.is_contiguous() and weight.dtype == up.dtype:
                weight.view(weight.shape[0], -1).addmm_(up, down)
            else:
                weight += function((up @ down).reshape(weight.shape).to(weight.dtype))
            return weight

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
        target = key_map.get(naming.ldm_to_kohya_key(name))
        if target is None:
            missing.append(name)
            continue
        patches[target] = cls(merged, name)
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
