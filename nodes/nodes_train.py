"""Training nodes: "ZipLoRA Merge (LoRA.rar)" and "Train Hypernetwork (LoRA.rar)".

Both run gradient descent through the loaded MODEL's UNet: ComfyUI executes nodes under
torch.inference_mode, so the work runs inside `torch.inference_mode(False)` + `enable_grad`.
The logic lives in `hypernet.nodelogic.train` (on top of `hypernet.training`).
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from . import paths
from .comfy_v3 import io

log = logging.getLogger(__name__)

CATEGORY = "LoRA.rar"
NO_INIT = "none (new hypernetwork)"


class _Progress:
    """comfy.utils.ProgressBar plus an ETA line in the log every few seconds."""

    def __init__(self, total: int, label: str):
        import comfy.utils

        self.bar = comfy.utils.ProgressBar(total)
        self.label, self.start, self.last = label, time.monotonic(), 0.0

    def __call__(self, done: int, total: int, record: dict) -> None:
        self.bar.update_absolute(done, total)
        now = time.monotonic()
        if now - self.last > 5 or done == total:
            self.last = now
            eta = (now - self.start) / done * (total - done)
            log.info("%s: step %d/%d, loss %.5g, eta %.0f s", self.label, done, total, record.get("total", float("nan")), eta)


def _hooks():
    import comfy.model_management

    from ..hypernet.nodelogic.train import ComfyHooks

    return ComfyHooks(
        check_interrupt=comfy.model_management.throw_exception_if_processing_interrupted,
        load_model=lambda model: comfy.model_management.load_models_gpu([model], force_full_load=True))


class LoraRarZipLoraMerge(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LoraRarZipLoraMerge",
            display_name="ZipLoRA Merge (LoRA.rar)",
            category=CATEGORY,
            description="Merge a subject LoRA and a style LoRA with ZipLoRA: optimise per-column merge "
                        "coefficients for this pair through the model (minutes on a GPU). The slow baseline "
                        "that LoRA.rar's hypernetwork replaces; same exact low-rank result type.",
            inputs=[
                io.Model.Input("model", tooltip="The base model (SDXL family) the LoRAs were trained for."),
                io.Clip.Input("clip", tooltip="Text encoder, used to encode the two prompts."),
                io.Vae.Input("vae", tooltip="VAE, used to encode the subject and style images."),
                io.LoraModel.Input("content_lora", tooltip="The subject (content) LoRA, e.g. from Load LoRA (LoRA.rar)."),
                io.Image.Input("subject_images", tooltip="Photos of the subject (a batch); one is drawn per step."),
                io.String.Input("subject_prompt", default="a photo of sks dog", multiline=True,
                                tooltip="The subject LoRA's training prompt, e.g. 'a photo of sks dog'."),
                io.LoraModel.Input("style_lora", tooltip="The style LoRA."),
                io.Image.Input("style_image", tooltip="The style reference image(s)."),
                io.String.Input("style_prompt", default="a cat in sks style", multiline=True,
                                tooltip="The style LoRA's training prompt, e.g. 'a cat in watercolor style'."),
                io.Int.Input("steps", default=100, min=1, max=10000, tooltip="Optimisation steps (ZipLoRA: 100)."),
                io.Float.Input("learning_rate", default=0.01, min=1e-5, max=1.0, step=0.001,
                               tooltip="Adam learning rate for the coefficients (0.01 as in LoRA.rar's runs)."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFF,
                             tooltip="Seed for the image choice, timesteps and noise of every step."),
                io.Int.Input("resolution", default=1024, min=256, max=2048, step=64,
                             tooltip="Images are centre-cropped and resized to this square size (SDXL: 1024)."),
            ],
            outputs=[
                io.Model.Output("patched_model", display_name="model", tooltip="The model with the ZipLoRA-merged LoRA applied."),
                io.LoraModel.Output("merged_lora", display_name="merged_lora",
                                    tooltip="The merged LoRA (exact, rank r_c + r_s); save it with Save Merged LoRA."),
                io.Image.Output("loss_curve", display_name="loss_curve", tooltip="Objective per step."),
            ],
        )

    @classmethod
    def execute(cls, model, clip, vae, content_lora, subject_images, subject_prompt, style_lora, style_image,
                style_prompt, steps, learning_rate, seed, resolution) -> io.NodeOutput:
        from ..hypernet.nodelogic import merge as merge_logic
        from ..hypernet.nodelogic.train import run_ziplora_node
        from ..hypernet.training.ziplora import ZipLoraSettings
        from . import merge_patches

        result = run_ziplora_node(
            model, clip, vae, content_lora, subject_images, subject_prompt, style_lora, style_image,
            style_prompt, ZipLoraSettings(steps=steps, lr=learning_rate, seed=seed), resolution, _hooks(),
            progress=_Progress(steps, "ZipLoRA"))
        new_model, _ = merge_patches.apply_merged(model, None, result.merged)
        merged = merge_logic.merged_lora_output(result.merged, content_lora, style_lora, None)
        return io.NodeOutput(new_model, merged, result.loss_image)


class LoraRarTrainHypernet(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        choices = [NO_INIT] + paths.hypernet_files()
        return io.Schema(
            node_id="LoraRarTrainHypernet",
            display_name="Train Hypernetwork (LoRA.rar)",
            category=CATEGORY,
            description="Train a LoRA.rar hypernetwork for this base model from a manifest of subject and "
                        "style LoRAs (see the pack's README). Saves it into models/lorarar, where Load "
                        "Hypernetwork (LoRA.rar) lists it; logs and checkpoints go to the output folder.",
            is_output_node=True,
            inputs=[
                io.Model.Input("model", tooltip="The base model the hypernetwork is for (SDXL, Pony, Illustrious, SD1.5 …)."),
                io.Clip.Input("clip", tooltip="Text encoder, used to encode the manifest's prompts."),
                io.Vae.Input("vae", tooltip="VAE, used to encode the manifest's images."),
                io.String.Input("manifest", default="", tooltip="Path of the training manifest (.json or .yaml) "
                                "listing subject and style LoRAs, their images and prompts."),
                io.String.Input("output_name", default="my_hypernet",
                                tooltip="File name (without extension) in models/lorarar."),
                io.Int.Input("steps", default=300, min=1, max=100000, tooltip="Optimizer steps (paper: a few hundred)."),
                io.Float.Input("learning_rate", default=0.01, min=1e-6, max=1.0, step=0.001,
                               tooltip="AdamW learning rate (paper: 0.01)."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFF,
                             tooltip="Seed for initialisation and every step's pair, image, timestep and noise."),
                io.Int.Input("resolution", default=1024, min=256, max=2048, step=64,
                             tooltip="Training images are centre-cropped and resized to this size."),
                io.Int.Input("checkpoint_every", default=100, min=0, max=100000,
                             tooltip="Steps between resumable checkpoints (0: only at the end)."),
                io.Int.Input("validate_every", default=100, min=0, max=100000,
                             tooltip="Steps between validations on held-out pairs (0: only at the end)."),
                io.Combo.Input("init_hypernet", options=choices, default=NO_INIT,
                               tooltip="Start from this hypernetwork (e.g. the official SDXL one); widths it lacks "
                                       "get new input layers."),
                io.Boolean.Input("gradient_checkpointing", default=False,
                                 tooltip="Recompute transformer blocks in the backward pass: less GPU memory, slower."),
                io.Boolean.Input("resume", default=False,
                                 tooltip="Continue from the newest checkpoint of a previous run with this output name."),
                io.Boolean.Input("overwrite", default=False, tooltip="Replace an existing models/lorarar file of this name."),
            ],
            outputs=[
                io.Image.Output("loss_plot", display_name="loss_plot", tooltip="Training and validation loss."),
                io.String.Output("summary", display_name="summary",
                                 tooltip="Where the hypernetwork was saved and its validation figures."),
            ],
        )

    @classmethod
    def fingerprint_inputs(cls, manifest, **kwargs):
        try:
            return (manifest, os.stat(manifest).st_mtime_ns)
        except OSError:
            return manifest

    @classmethod
    def execute(cls, model, clip, vae, manifest, output_name, steps, learning_rate, seed, resolution,
                checkpoint_every, validate_every, init_hypernet, gradient_checkpointing, resume,
                overwrite) -> io.NodeOutput:
        import folder_paths

        from ..hypernet.errors import TrainingError
        from ..hypernet.model import load_hypernet
        from ..hypernet.nodelogic.train import run_train_node
        from ..hypernet.training.trainer import TrainSettings

        name = Path(output_name.strip() or "my_hypernet").name.removesuffix(".safetensors")
        init = None
        if init_hypernet != NO_INIT:
            init_path = paths.hypernet_full_path(init_hypernet)
            if init_path is None:
                raise TrainingError(f"init_hypernet: {init_hypernet} is not in models/lorarar")
            init = load_hypernet(init_path)
        settings = TrainSettings(steps=steps, lr=learning_rate, seed=seed, checkpoint_every=checkpoint_every,
                                 validate_every=validate_every, gradient_checkpointing=gradient_checkpointing,
                                 name=name)
        result = run_train_node(
            model, clip, vae, manifest, Path(paths.default_model_folder()) / f"{name}.safetensors",
            Path(folder_paths.get_output_directory()) / "lorarar_training" / name, settings, resolution,
            init, resume, overwrite, _hooks(), progress=_Progress(steps, "Train Hypernetwork"))
        return io.NodeOutput(result.loss_image, result.summary)


NODES = [LoraRarZipLoraMerge, LoraRarTrainHypernet]
