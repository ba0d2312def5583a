"""LoRA file nodes: "Load LoRA (LoRA.rar)" and "Save Merged LoRA (LoRA.rar)".

Both speak core's `LORA_MODEL` socket (a raw state dict), so they interoperate with core's
"Load LoRA Model" / "Save LoRA" and with LoRAs coming out of core's training node. The logic is
in `hypernet.nodelogic`; this module only adds schemas and folder lookups.
"""

from __future__ import annotations

import logging
import os

from ..hypernet.errors import LoraFormatError
from ..hypernet.nodelogic import lora as lora_logic
from ..hypernet.writer import DTYPES
from .comfy_v3 import io, ui
from .feedback import show_on_node

CATEGORY = "LoRA.rar"


def _lora_files() -> list[str]:
    import folder_paths

    return [n for n in folder_paths.get_filename_list("loras") if lora_logic.is_lora_file_name(n)]


class LoraRarLoadLora(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LoraRarLoadLora",
            display_name="Load LoRA (LoRA.rar)",
            category=CATEGORY,
            description="Read a LoRA file from models/loras as a LORA_MODEL (any family this pack knows, any "
                        "key layout: kohya, diffusers, peft, ComfyUI, …) for LoRA.rar Merge or core's LoRA nodes.",
            inputs=[
                io.Combo.Input("lora_name", options=_lora_files(),
                               tooltip="A .safetensors LoRA from models/loras (pickled .pt/.ckpt "
                                       "LoRAs are refused because loading them can run code)."),
            ],
            outputs=[io.LoraModel.Output("lora", display_name="lora",
                                         tooltip="The LoRA's tensors, unchanged (core's LORA_MODEL type).")],
        )

    @classmethod
    def fingerprint_inputs(cls, lora_name):
        # Reload when the file changes on disk under the same name.
        import folder_paths

        path = folder_paths.get_full_path("loras", lora_name)
        if path is None:
            return lora_name
        stat = os.stat(path)
        return (lora_name, stat.st_mtime_ns, stat.st_size)

    @classmethod
    def execute(cls, lora_name) -> io.NodeOutput:
        import folder_paths

        if not lora_logic.is_lora_file_name(lora_name):
            raise LoraFormatError(
                f"lora_name: {lora_name} is not a .safetensors file; only safetensors LoRAs are read")
        path = folder_paths.get_full_path("loras", lora_name)
        if path is None:
            raise LoraFormatError(f"lora_name: {lora_name} was not found in the loras folders")
        return io.NodeOutput(lora_logic.load_lora_model(path, lora_name))


class LoraRarSaveMergedLora(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LoraRarSaveMergedLora",
            display_name="Save Merged LoRA (LoRA.rar)",
            category=CATEGORY,
            description="Write a LORA_MODEL (normally LoRA.rar Merge's merged_lora) into models/loras "
                        "as a kohya SDXL LoRA that loads in any LoRA loader. Never overwrites.",
            inputs=[
                io.LoraModel.Input("merged_lora",
                                   tooltip="The LoRA to save. From LoRA.rar Merge it is written with "
                                           "its merge provenance (method, strengths, source hashes)."),
                io.String.Input("filename_prefix", default=lora_logic.DEFAULT_SAVE_PREFIX,
                                tooltip="File name relative to models/loras; subfolders allowed, '..' "
                                        "and absolute paths are not. A counter is appended "
                                        "(_00001, _00002, …); existing files are never overwritten."),
                io.Combo.Input("dtype", options=list(DTYPES), default="fp32",
                               tooltip="Precision of the saved factors. fp16/bf16 halve the file size; "
                                       "fp32 keeps the merge exact."),
            ],
            outputs=[io.String.Output("saved", display_name="saved",
                                      tooltip="Where the file was written (models/loras/…), or why nothing was. "
                                              "The node also shows it while it runs; connect a Preview Any to "
                                              "keep reading it after the run (frontend 1.3x and newer clear the "
                                              "node's own text when the run ends).")],
            hidden=[io.Hidden.unique_id],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, merged_lora, filename_prefix, dtype) -> io.NodeOutput:
        import folder_paths

        node_id = getattr(cls.hidden, "unique_id", None) if getattr(cls, "hidden", None) else None
        reason = lora_logic.unsaveable_reason(merged_lora)
        if reason is not None:
            text = f"Nothing written: {reason}."
            show_on_node(node_id, text, logging.WARNING)
            return io.NodeOutput(text, ui=ui.PreviewText(text))
        loras_dir = folder_paths.get_folder_paths("loras")[0]
        # the other registered LoRA folders are where a symlinked subfolder may lead (see save_folder)
        path = lora_logic.save_lora_model(merged_lora, loras_dir, filename_prefix, dtype,
                                          extra_roots=folder_paths.get_folder_paths("loras")[1:])
        relative = os.path.relpath(path, loras_dir).replace(os.sep, "/")
        # The LoRA loaders' lists come from the node definitions the page loaded: the frontend
        # re-reads them (and so lists the new file) on Refresh Node Definitions, key R.
        text = (f"Saved models/loras/{relative}\nPress R (Refresh Node Definitions) and it is listed "
                "in every LoRA loader.")
        show_on_node(node_id, text)
        return io.NodeOutput(text, ui=ui.PreviewText(text))


NODES = [LoraRarLoadLora, LoraRarSaveMergedLora]
