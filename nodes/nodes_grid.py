"""Grid node: "Labelled Image Grid (LoRA.rar)" — a batch of images in one picture, each under its
label (e.g. the merge method that made it). Logic in `hypernet.nodelogic.grid`."""

from __future__ import annotations

from ..hypernet.nodelogic import grid as grid_logic
from .comfy_v3 import io

CATEGORY = "LoRA.rar"


class LoraRarLabelledGrid(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LoraRarLabelledGrid",
            display_name="Labelled Image Grid (LoRA.rar)",
            category=CATEGORY,
            description="Put a batch of images side by side in one picture, each with its label above "
                        "it — for comparing merge methods or settings on the same seed.",
            inputs=[
                io.Image.Input("images", tooltip="The images, as one batch (e.g. from core's Batch Images "
                                                 "nodes), in the order of the labels."),
                io.String.Input("labels", default="lorarar, np-lora, k-lora, sum", multiline=True,
                                tooltip="One label per image, one per line or separated by commas, in the "
                                        "order of the batch."),
                io.Int.Input("columns", default=0, min=0, max=grid_logic.MAX_IMAGES,
                             tooltip="Images per row; 0 = as square as possible."),
            ],
            outputs=[io.Image.Output("grid", display_name="grid", tooltip="One image: the labelled grid.")],
        )

    @classmethod
    def execute(cls, images, labels, columns) -> io.NodeOutput:
        return io.NodeOutput(grid_logic.labelled_grid(images, labels, columns))


NODES = [LoraRarLabelledGrid]
