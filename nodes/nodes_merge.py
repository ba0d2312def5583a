"""Merge nodes: "Load Hypernetwork (LoRA.rar)" and "LoRA.rar Merge".

The merge patches MODEL/CLIP through `comfy.sd.load_lora_for_models` with a few batched dicts
(see `hypernet.nodelogic.merge.patch_plan`), outputs the exact merged LoRA lazily as a LORA_MODEL and
draws the merge coefficients per UNet transformer block. Logic lives in `hypernet.nodelogic.hypernet` and `.merge`.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from ..hypernet.merge import METHODS
from ..hypernet.nodelogic import hypernet as hypernet_logic
from ..hypernet.nodelogic import merge as merge_logic
from . import paths
from .comfy_v3 import io

log = logging.getLogger(__name__)

CATEGORY = "LoRA.rar"
Hypernet = io.Custom("LORARAR_HYPERNET")


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


class LoraRarMerge(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        strength = dict(default=1.0, min=-10.0, max=10.0, step=0.01)
        return io.Schema(
            node_id="LoraRarMerge",
            display_name="LoRA.rar Merge",
            category=CATEGORY,
            description="Merge a subject (content) LoRA and a style LoRA for SDXL: the hypernetwork "
                        "predicts how much of each to keep per column of every attention q/out "
                        "matrix; every other layer is summed. Patches MODEL and CLIP.",
            inputs=[
                io.Model.Input("model", tooltip="The SDXL-family diffusion model to patch."),
                io.Clip.Input("clip", optional=True,
                              tooltip="Optional text encoders; the LoRAs' text-encoder layers (summed, "
                                      "never merged by the hypernetwork) are applied to it."),
                io.LoraModel.Input("content_lora",
                                   tooltip="The subject LoRA (e.g. trained on photos of your dog)."),
                io.LoraModel.Input("style_lora", tooltip="The style LoRA (e.g. watercolor)."),
                Hypernet.Input("hypernetwork", optional=True,
                               tooltip="From Load Hypernetwork (LoRA.rar). Needed for method "
                                       "'lorarar'; unused for 'sum'."),
                io.Float.Input("content_strength", **strength,
                               tooltip="Multiplies the content LoRA's contribution after the "
                                       "hypernetwork (changing it does not rerun the hypernetwork)."),
                io.Float.Input("style_strength", **strength,
                               tooltip="Multiplies the style LoRA's contribution after the hypernetwork."),
                io.Combo.Input("method", options=list(METHODS), default="lorarar",
                               tooltip="lorarar: hypernetwork coefficients on to_q/to_out.0 of every "
                                       "attention layer. sum: plain sum of both LoRAs (baseline)."),
            ],
            outputs=[
                io.Model.Output("patched_model", display_name="model", tooltip="The model with the merged LoRA applied."),
                io.Clip.Output("patched_clip", display_name="clip",
                               tooltip="The text encoders with both LoRAs' text-encoder layers (None if no clip input)."),
                io.LoraModel.Output("merged_lora", display_name="merged_lora",
                                    tooltip="The merged LoRA (kohya keys, exact, rank r_c + r_s) for "
                                            "Save Merged LoRA or core's LoRA nodes."),
                io.Image.Output("coefficient_plot", display_name="coefficient_plot",
                                tooltip="Mean content/style coefficients per UNet transformer block."),
            ],
        )

    @classmethod
    def execute(cls, model, content_lora, style_lora, content_strength, style_strength, method,
                clip=None, hypernetwork=None) -> io.NodeOutput:
        import comfy.sd
        import comfy.utils

        bar = comfy.utils.ProgressBar(1)
        merged = merge_logic.run_merge(
            content_lora, style_lora, hypernetwork, content_strength, style_strength, method,
            progress=lambda done, total: bar.update_absolute(done, total))
        new_model, new_clip = model, clip
        plan = merge_logic.patch_plan(merged, include_text_encoders=clip is not None)
        for state_dict, strength in plan:
            new_model, new_clip = comfy.sd.load_lora_for_models(new_model, new_clip, state_dict, strength, strength)
        if not plan:  # both strengths 0: hand out the inputs unchanged
            new_model, new_clip = model, clip

        hypernet_name = hypernetwork.config.name if (hypernetwork is not None and method == "lorarar") else ""
        content_name = merge_logic.name_of(content_lora, "content LoRA")
        style_name = merge_logic.name_of(style_lora, "style LoRA")
        image = merge_logic.coefficient_image(merged, content_name, style_name, hypernet_name)
        output = merge_logic.merged_lora_output(merged, content_lora, style_lora,
                                                hypernetwork if method == "lorarar" else None)
        return io.NodeOutput(new_model, new_clip, output, image)


NODES = [LoraRarLoadHypernet, LoraRarMerge]
