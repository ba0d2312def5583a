"""Merge nodes: "Load Hypernetwork (LoRA.rar)" and "LoRA.rar Merge".

The merge patches MODEL/CLIP through `comfy.sd.load_lora_for_models` with a few batched dicts
(see `hypernet.nodelogic.merge.patch_plan`), outputs the exact merged LoRA lazily as a LORA_MODEL and
draws what the method did per UNet transformer block. Logic lives in `hypernet.nodelogic.hypernet` and `.merge`.

K-LoRA's model changes patches during sampling (`KLoraSwitcher`): every layer that switches inside
sampling is patched with its content side like any LoRA, and when sampling reaches the layer's
switch point its patch is exchanged for the style side and that one weight is updated (see
`KLoraSwitcher` for how, on the CPU and on a GPU); after sampling the kept content-state tensors
are put back. Each layer switches at most once per image, so the added
work per image is about one LoRA patch of the switching layers, and per step one comparison of
the noise level. Alternatives: ComfyUI's hook keyframes re-patch *every* hooked weight at each
keyframe change and are attached to conditioning, not to a MODEL; bypass-style forward hooks add
two small matmuls per switching layer to every model call (both measured in
benchmarks/bench_methods.py).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from ..hypernet.errors import LoraMismatchError
from ..hypernet.merge import METHODS, REGISTRY
from ..hypernet.nodelogic import hypernet as hypernet_logic
from ..hypernet.nodelogic import merge as merge_logic
from . import merge_patches, paths
from .comfy_v3 import io

log = logging.getLogger(__name__)

CATEGORY = "LoRA.rar"
Hypernet = io.Custom("LORARAR_HYPERNET")

SWITCH_CALLBACK_KEY = "lorarar_k_lora"


class KLoraSwitcher:
    """Exchanges, during sampling, the content patch of each switching layer for its style patch
    once sampling reaches the layer's switch point; restores the content patches when sampling
    ends, so outside sampling the MODEL is its p = 0 state (what ComfyUI's own patching of it,
    a weight dump or another node sees). Registered as ModelPatcher callbacks, which every clone
    of the model keeps: ON_PRE_RUN (noise levels of the switch points), ON_PREPARE_STATE (every
    model call, with its sigma), ON_CLEANUP (after sampling, also after an error or interrupt).

    A layer switched to its style side is re-patched as ComfyUI patches at load
    (`patch_weight_to_device`, from the original weight and the exchanged patch list) where the
    original sits on the weight's device (CPU runs); on a GPU, whose originals ComfyUI keeps in CPU
    memory, it is computed where the weight is instead: the weight in place minus the content
    patch plus the style patch (ComfyUI's patch maths, `comfy.lora.calculate_weight`; equal to the
    load-time result up to one rounding of the weight's dtype). Either way the content-state tensor
    is kept aside, so switching back is putting it back — exact, no arithmetic. That costs one extra
    copy of the switched layers while sampling runs; where the device lacks the room for it (or the
    model is patched in place), both directions re-patch from ComfyUI's original."""

    def __init__(self, timeline, keys: dict[str, str], content_patches: dict, style_patches: dict):
        self.timeline = timeline
        self.weight_keys = [keys[module] for module in timeline.order]
        self.content_patches, self.style_patches = content_patches, style_patches
        self.applied = 0   # layers (a prefix of the timeline) now on their style patch
        self.fast = True   # keep content-state tensors aside (see the class docstring)
        # True: compute style weights from the weight in place wherever the original is (the GPU
        # path; lets a CPU-only test run it)
        self.update_in_place = False
        self._kept: dict[str, tuple] = {}   # key → (content-state tensor, the style tensor put in its place)

    def register(self, patcher) -> None:
        from comfy.patcher_extension import CallbacksMP

        patcher.add_callback_with_key(CallbacksMP.ON_PRE_RUN, SWITCH_CALLBACK_KEY, self.on_pre_run)
        patcher.add_callback_with_key(CallbacksMP.ON_PREPARE_STATE, SWITCH_CALLBACK_KEY, self.on_prepare_state)
        patcher.add_callback_with_key(CallbacksMP.ON_CLEANUP, SWITCH_CALLBACK_KEY, self.on_cleanup)

    def on_pre_run(self, patcher) -> None:
        import comfy.model_management
        import comfy.utils

        model_sampling = patcher.get_model_object("model_sampling")
        self.timeline.set_noise_levels(model_sampling.percent_to_sigma)
        # Whatever an interrupted run left in this patcher's lists: back to content.
        self.applied = len(self.weight_keys)
        self._move(patcher, 0)
        self._kept.clear()
        weights = [comfy.utils.get_attr(patcher.model, key) for key in self.weight_keys if key in patcher.backup]
        if weights:
            needed = sum(w.numel() * w.element_size() for w in weights)
            free = comfy.model_management.get_free_memory(weights[0].device)
            self.fast = free > needed + comfy.model_management.minimum_inference_memory()

    def on_prepare_state(self, patcher, timestep) -> None:
        self._move(patcher, self.timeline.switched(float(timestep.reshape(-1)[0])))

    def on_cleanup(self, patcher) -> None:
        self._move(patcher, 0)
        self._kept.clear()

    def _move(self, patcher, target: int) -> None:
        if target == self.applied:
            return
        if target > self.applied:
            for key in self.weight_keys[self.applied:target]:
                self._exchange(patcher, key, self.content_patches[key], self.style_patches[key], to_style=True)
        else:
            for key in self.weight_keys[target:self.applied]:
                self._exchange(patcher, key, self.style_patches[key], self.content_patches[key], to_style=False)
        self.applied = target

    def _exchange(self, patcher, key: str, old, new, to_style: bool) -> None:
        import comfy.float
        import comfy.lora
        import comfy.model_patcher
        import comfy.utils
        import torch

        patches = patcher.patches.get(key, [])
        index = next((i for i, patch in enumerate(patches) if patch is old), None)
        if index is None:
            return  # already exchanged (or the patch list was rebuilt by a node downstream)
        patches[index] = new
        # Modules loaded in low-VRAM mode read the (now exchanged) patch list on every call by
        # themselves; weights patched at load time are changed here.
        backup = patcher.backup.get(key)
        if backup is None:
            return
        current = comfy.utils.get_attr(patcher.model, key)
        kept = self._kept.pop(key, None)
        if not to_style and kept is not None and kept[1] is current:
            comfy.utils.set_attr(patcher.model, key, kept[0])  # the content-state tensor, as it was
            return
        keep = to_style and self.fast and not backup.inplace_update
        if keep and (backup.weight.device != current.device or self.update_in_place):
            # The original is on another device (a GPU run): update the weight where it is, from
            # the weight in place — the same patch at minus its strength, then the new one.
            removed = (-old[0], *old[1:])
            weight = comfy.lora.calculate_weight([removed, new], current.to(torch.float32, copy=True), key)
            weight = comfy.float.stochastic_rounding(weight, current.dtype, seed=comfy.model_patcher.string_to_seed(key))
            comfy.utils.set_attr(patcher.model, key, torch.nn.Parameter(weight, requires_grad=False))
        else:
            # Exactly as ComfyUI patches at load: from the original weight, with the current list
            # (no copy across devices where the original sits beside the weight, e.g. on the CPU).
            if backup.inplace_update:
                comfy.utils.copy_to_param(patcher.model, key, backup.weight)
            else:
                comfy.utils.set_attr_param(patcher.model, key, backup.weight)
            patcher.patch_weight_to_device(key, device_to=current.device)
        if keep:
            self._kept[key] = (current, comfy.utils.get_attr(patcher.model, key))


def scheduled_model(model, plan):
    """A clone of `model` whose switching layers follow `plan` during sampling (see KLoraSwitcher)."""
    import comfy.lora

    from ..hypernet.nodelogic.merge import SwitchTimeline

    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    keys = {module: key_map[module] for module in plan.points if module in key_map}
    missing = sorted(set(plan.points) - set(keys))
    if missing:
        raise LoraMismatchError(f"model: the k-lora merge switches layers this model does not have, "
                                f"e.g. {missing[0]}; is it an SDXL-family model?")
    to_load = {module: keys[module] for module in keys}
    content = comfy.lora.load_lora(plan.content, to_load, log_missing=False)
    style = comfy.lora.load_lora(plan.style, to_load, log_missing=False)
    patched = model.clone()
    patched.add_patches({key: content[key] for key in keys.values()}, plan.content_strength)  # one call (DESIGN §8)
    content_patches = {key: patched.patches[key][-1] for key in keys.values()}
    # the tuple add_patches builds: (strength_patch, patch, strength_model, offset, function)
    style_patches = {key: (plan.style_strength, style[key], 1.0, None, None) for key in keys.values()}
    KLoraSwitcher(SwitchTimeline(plan.points), keys, content_patches, style_patches).register(patched)
    return patched


class LoraRarLoadHypernet(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        choices = hypernet_logic.hypernet_choices(paths.hypernet_files())
        return io.Schema(
            node_id="LoraRarLoadHypernet",
            display_name="Load Hypernetwork (LoRA.rar)",
            category=CATEGORY,
            description="Load a LoRA.rar hypernetwork that predicts per-column merge coefficients "
                        "for a subject LoRA and a style LoRA.",
            inputs=[
                io.Combo.Input("hypernet_name", options=choices, default=choices[0],
                               tooltip=hypernet_logic.hypernet_file_tooltip()),
                io.Boolean.Input("download", default=False, tooltip=hypernet_logic.download_tooltip()),
            ],
            outputs=[Hypernet.Output("hypernetwork", display_name="hypernetwork",
                                     tooltip="The loaded hypernetwork, for LoRA.rar Merge.")],
        )

    @classmethod
    def fingerprint_inputs(cls, hypernet_name, download):
        path = paths.hypernet_full_path(hypernet_name)
        if path is None:
            return (hypernet_name, download)
        stat = os.stat(path)
        return (hypernet_name, stat.st_mtime_ns, stat.st_size)

    @classmethod
    def execute(cls, hypernet_name, download) -> io.NodeOutput:
        import comfy.utils

        bar = comfy.utils.ProgressBar(100)
        model = hypernet_logic.resolve_hypernet_choice(
            hypernet_name, paths.hypernet_full_path(hypernet_name), download,
            download_dir=Path(paths.default_model_folder()),
            search_dirs=[Path(p) for p in paths.model_folder_paths()],
            progress=lambda done, total: bar.update_absolute(done, total))
        if model.config.license:
            log.info("hypernetwork %s: license %s", hypernet_name, model.config.license)
        return io.NodeOutput(model)


def _method_tooltip() -> str:
    return ("lorarar: hypernetwork coefficients on to_q/to_out.0 of every attention layer (needs the "
            "hypernetwork). np-lora: the subject LoRA is projected away from the style LoRA's main "
            "directions on every layer (set mu). k-lora: each attention layer uses the subject LoRA early "
            "in sampling and the style LoRA from its own switch point on; no single merged LoRA. "
            "sum: plain sum of both LoRAs (baseline).")


class LoraRarMerge(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        strength = dict(default=1.0, min=-10.0, max=10.0, step=0.01)
        np_params, k_params = REGISTRY["np-lora"].params, REGISTRY["k-lora"].params
        return io.Schema(
            node_id="LoraRarMerge",
            display_name="LoRA.rar Merge",
            category=CATEGORY,
            description="Merge a subject (content) LoRA and a style LoRA for SDXL with one of four "
                        "methods: LoRA.rar's hypernetwork, NP-LoRA, K-LoRA or the plain sum. Patches "
                        "MODEL and CLIP.",
            # Saved workflows store widget values by position: new inputs go at the END only.
            inputs=[
                io.Model.Input("model", tooltip="The SDXL-family diffusion model to patch."),
                io.Clip.Input("clip", optional=True,
                              tooltip="Optional text encoders; the LoRAs' text-encoder layers (summed, "
                                      "never merged by the hypernetwork; projected by np-lora) are applied to it."),
                io.LoraModel.Input("content_lora",
                                   tooltip="The subject LoRA (e.g. trained on photos of your dog)."),
                io.LoraModel.Input("style_lora", tooltip="The style LoRA (e.g. watercolor)."),
                Hypernet.Input("hypernetwork", optional=True,
                               tooltip="From Load Hypernetwork (LoRA.rar). Needed for method "
                                       "'lorarar'; unused by np-lora, k-lora and sum."),
                io.Float.Input("content_strength", **strength,
                               tooltip="Multiplies the content LoRA's contribution after the method "
                                       "(changing it does not rerun the method)."),
                io.Float.Input("style_strength", **strength,
                               tooltip="Multiplies the style LoRA's contribution after the method."),
                io.Combo.Input("method", options=list(METHODS), default="lorarar", tooltip=_method_tooltip()),
                io.Float.Input("mu", default=np_params["mu"].default, min=0.0, max=1000.0, step=0.05, optional=True,
                               tooltip="np-lora only: projection strength. 0 = plain sum; 0.5 = the paper's "
                                       "default; larger removes more of the subject LoRA along the style's "
                                       "directions (c = mu/(1+mu))."),
                io.Int.Input("np_rank", default=0, min=0, max=4096, optional=True,
                             tooltip="np-lora only: how many of the style LoRA's strongest directions to "
                                     "project out per layer; 0 = all of them (the style LoRA's rank)."),
                io.Combo.Input("np_side", options=list(np_params["side"].choices), default="input", optional=True,
                               tooltip="np-lora only: 'input' projects what the subject LoRA reads "
                                       "(the paper's Eq. 11, default); 'output' what it writes (Eq. 21)."),
                io.Int.Input("k_top_k", default=k_params["top_k"].default, min=1, max=1 << 20, optional=True,
                             tooltip="k-lora only: how many of each layer's largest LoRA entries are summed "
                                     "to compare the two LoRAs (official: 64)."),
                io.Float.Input("k_alpha", default=k_params["alpha"].default, min=0.01, max=100.0, step=0.05,
                               optional=True,
                               tooltip="k-lora only: how fast the style LoRA takes over as sampling "
                                       "progresses (official: 1.5; larger = earlier)."),
                io.Float.Input("k_beta", default=k_params["beta"].default, min=-10.0, max=10.0, step=0.05,
                               optional=True,
                               tooltip="k-lora only: the style LoRA's weight at the start of sampling "
                                       "(official: 0.5; larger = style takes over earlier)."),
            ],
            outputs=[
                io.Model.Output("patched_model", display_name="model",
                                tooltip="The model with the merge applied (k-lora: its layers switch from the "
                                        "subject to the style LoRA while sampling)."),
                io.Clip.Output("patched_clip", display_name="clip",
                               tooltip="The text encoders with both LoRAs' text-encoder layers (None if no clip input)."),
                io.LoraModel.Output("merged_lora", display_name="merged_lora",
                                    tooltip="The merged LoRA (kohya keys, exact, rank r_c + r_s) for "
                                            "Save Merged LoRA or core's LoRA nodes. Not available for k-lora, "
                                            "which is not one LoRA (using it says so)."),
                io.Image.Output("coefficient_plot", display_name="coefficient_plot",
                                tooltip="What the method did per UNet transformer block: lorarar's mean "
                                        "coefficients, np-lora's removed share, k-lora's switch point per layer."),
                io.String.Output("report", display_name="report",
                                 tooltip="What the merge did, as text: layers per kind, and every warning — "
                                         "layers of an input LEFT OUT (keys not recognised), alpha assumed "
                                         "1 where a file has none. Connect it to a Preview Any node to read it."),
            ],
        )

    @classmethod
    def execute(cls, model, content_lora, style_lora, content_strength, style_strength, method,
                clip=None, hypernetwork=None, **method_inputs) -> io.NodeOutput:
        import comfy.model_management
        import comfy.sd
        import comfy.utils

        bar = comfy.utils.ProgressBar(1)
        params = merge_logic.node_params(method, method_inputs)
        if method in ("k-lora", "lorarar"):  # H / k-lora's dense products run where ComfyUI computes
            params["device"] = str(comfy.model_management.get_torch_device())
        merged = merge_logic.run_merge(
            content_lora, style_lora, hypernetwork, content_strength, style_strength, method,
            params=params,
            progress=lambda done, total: bar.update_absolute(done, total))
        new_model, new_clip = model, clip
        include_text_encoders = clip is not None
        switching, patched = None, None
        active = bool(merged.layers) and (content_strength != 0 or style_strength != 0)
        if merged.switch_points:
            switching = merge_logic.switch_plan(merged, include_text_encoders)
            plan = switching.static
        elif active:
            # one patch per merged weight where this ComfyUI supports it (merge_patches.py);
            # otherwise each side as its own LoRA
            patched = merge_patches.patch_models(
                model, clip, merged, lambda names: merge_logic.patch_plan_of(merged, names, include_text_encoders))
            plan = [] if patched is not None else merge_logic.patch_plan(merged, include_text_encoders)
        else:
            plan = []
        for state_dict, strength in plan:
            new_model, new_clip = comfy.sd.load_lora_for_models(new_model, new_clip, state_dict, strength, strength)
        if patched is not None:
            new_model, new_clip = patched
        elif not plan:  # both strengths 0: hand out the inputs unchanged
            new_model, new_clip = model, clip
        if switching is not None and switching.points and (content_strength != 0 or style_strength != 0):
            new_model = scheduled_model(new_model, switching)

        hypernet_name = hypernetwork.config.name if (hypernetwork is not None and method == "lorarar") else ""
        content_name = merge_logic.name_of(content_lora, "content LoRA")
        style_name = merge_logic.name_of(style_lora, "style LoRA")
        image = merge_logic.coefficient_image(merged, content_name, style_name, hypernet_name)
        output = merge_logic.merged_lora_output(merged, content_lora, style_lora,
                                                hypernetwork if method == "lorarar" else None)
        report = merge_logic.report_text(merged)
        for note in merged.report.notes:  # also in the server log, for workflows that leave `report` unconnected
            log.warning("LoRA.rar Merge: %s", note)
        return io.NodeOutput(new_model, new_clip, output, image, report)


NODES = [LoraRarLoadHypernet, LoraRarMerge]
