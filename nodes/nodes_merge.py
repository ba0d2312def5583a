"""Merge nodes: "Load Hypernetwork (LoRA.rar)" and "LoRA.rar Merge".

The merge patches MODEL/CLIP with one patch per merged weight (`merge_patches.py`), outputs the
exact merged LoRA lazily as a LORA_MODEL and draws what the method did per UNet transformer block.
Logic lives in `hypernet.nodelogic.hypernet` and `.merge`.

K-LoRA's model switches layers from the content to the style LoRA during sampling
(`k_lora_patching.py`: the schedule is `hypernet.nodelogic.switching.KLoraSwitcher`; how a weight
moves depends on the ComfyUI and is explained there). Alternatives measured in
benchmarks/bench_methods.py: ComfyUI's hook keyframes re-patch *every* hooked weight at each
keyframe change and are attached to conditioning, not to a MODEL; bypass-style forward hooks add
two small matmuls per switching layer to every model call.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from ..hypernet.errors import LoraRarError
from ..hypernet.merge import REGISTRY, widgets
from ..hypernet.nodelogic import hypernet as hypernet_logic
from ..hypernet.nodelogic import merge as merge_logic
from . import merge_patches, paths
from .comfy_v3 import io
from .feedback import show_on_node

log = logging.getLogger(__name__)

CATEGORY = "LoRA.rar"
Hypernet = io.Custom("LORARAR_HYPERNET")

class LoraRarLoadHypernet(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        choices = hypernet_logic.hypernet_choices(paths.hypernet_files(), paths.hypernet_full_path)
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
        return io.NodeOutput(model)  # (the loader logs a checkpoint's license once, when it reads the file)


def _widget(widget):
    """A method setting's widget, as the registry describes it (optional: a workflow saved before
    the widget existed still loads, with its default)."""
    common = dict(default=widget.default, optional=True, tooltip=widget.tooltip)
    if widget.kind == "combo":
        choices = next(p.choices for _, _, p in widgets() if p.widget is widget)
        return io.Combo.Input(widget.name, options=list(choices), **common)
    bounds = {k: v for k, v in (("min", widget.min), ("max", widget.max), ("step", widget.step)) if v is not None}
    kind = io.Float if widget.kind == "float" else io.Int
    return kind.Input(widget.name, **common, **bounds)


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
        return io.Schema(
            node_id="LoraRarMerge",
            display_name="LoRA.rar Merge",
            category=CATEGORY,
            description="Merge a subject (content) LoRA and a style LoRA with one of four methods: "
                        "LoRA.rar's hypernetwork, NP-LoRA, K-LoRA or the plain sum — SDXL, SD1.5/SD2, Flux, "
                        "SD3.5, Qwen-Image, Z-Image or Wan (the family is read from the LoRAs). Patches "
                        "MODEL and CLIP.",
            # Saved workflows store widget values by position: new inputs go at the END only.
            inputs=[
                io.Model.Input("model", optional=True,
                               tooltip="The diffusion model to patch — SDXL, SD1.5/SD2, Flux, SD3.5, Qwen-Image, "
                                       "Z-Image or Wan; the LoRAs must be for it. Optional: without it the "
                                       "node only merges the two files (merged_lora, plot, report) — "
                                       "enough for Save Merged LoRA; k-lora needs it."),
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
                io.Combo.Input("method", options=list(REGISTRY), default="lorarar", tooltip=_method_tooltip()),
                # every method's settings, in the registry's order (hypernet/merge.py)
                *(_widget(param.widget) for _, _, param in widgets()),
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
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, content_lora, style_lora, content_strength, style_strength, method, model=None,
                clip=None, hypernetwork=None, **method_inputs) -> io.NodeOutput:
        import comfy.model_management
        import comfy.utils

        if method == "k-lora" and model is None:
            raise LoraRarError("model: k-lora switches between the two LoRAs while the model samples, so it "
                               "needs a MODEL; connect one, or choose lorarar, np-lora or sum to make a "
                               "merged LoRA file without a model")
        bar = comfy.utils.ProgressBar(1)
        # H / k-lora's dense products run where ComfyUI computes
        params = merge_logic.node_params(method, method_inputs, str(comfy.model_management.get_torch_device()))
        merged = merge_logic.run_merge(
            content_lora, style_lora, hypernetwork, content_strength, style_strength, method,
            params=params, model_family=merge_patches.model_family(model),
            progress=lambda done, total: bar.update_absolute(done, total))
        new_model, new_clip = merge_patches.apply_merged(model, clip, merged)

        hypernet_name = hypernetwork.config.name if (hypernetwork is not None and method == "lorarar") else ""
        content_name = merge_logic.name_of(content_lora, "content LoRA")
        style_name = merge_logic.name_of(style_lora, "style LoRA")
        image = merge_logic.coefficient_image(merged, content_name, style_name, hypernet_name)
        output = merge_logic.merged_lora_output(merged, content_lora, style_lora,
                                                hypernetwork if method == "lorarar" else None)
        report = merge_logic.report_text(merged)
        for note in merged.report.notes:  # in the server log too, for workflows that leave `report` unconnected
            log.info("LoRA.rar Merge: %s", note)
        if merged.report.alerts:  # what must not go unseen: on the node (an empty merge, layers left out)
            node_id = getattr(cls.hidden, "unique_id", None) if getattr(cls, "hidden", None) else None
            show_on_node(node_id, "\n".join(merged.report.alerts), logging.WARNING)
        return io.NodeOutput(new_model, new_clip, output, image, report)


NODES = [LoraRarLoadHypernet, LoraRarMerge]
