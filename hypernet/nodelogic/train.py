"""Logic of the training nodes (nodes/nodes_train.py): ZipLoRA for one pair and hypernetwork
training, run through a ComfyUI MODEL/CLIP/VAE that `training.comfy_adapter` wraps duck-typed.

ComfyUI executes nodes under torch.inference_mode, so both run inside
`torch.inference_mode(False)` + `enable_grad`. What only ComfyUI can give (its interrupt check,
`load_models_gpu`, the output folder) comes in as arguments.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import OutputExistsError, TrainingError
from ..merged import MergedLora
from ..model import HyperNetwork
from ..training.comfy_adapter import comfy_training_base
from ..training.data import TrainingBase, encode_examples, fit_image
from ..training.injection import linear_layer_shapes
from ..training.manifest import check_loras, load_manifest
from ..training.plot import plot_curves
from ..training.trainer import Trainer, TrainSettings
from ..training.ziplora import ZipLoraSettings, ziplora_merge
from . import plot
from .lora import lora_file_of, name_of

log = logging.getLogger(__name__)

StepProgress = Callable[[int, int, dict], None]


@dataclass
class ComfyHooks:
    """What the training nodes need from ComfyUI, passed in so this module never imports it."""

    check_interrupt: Callable[[], None] | None = None
    load_model: Callable[[object], None] | None = None   # e.g. load_models_gpu([model], force_full_load=True)


def training_base(model, clip, vae, resolution: int, hooks: ComfyHooks) -> TrainingBase:
    load = (lambda: hooks.load_model(model)) if hooks.load_model else None
    return comfy_training_base(model, clip, vae, resolution, check_interrupt=hooks.check_interrupt, load_model=load)


def encode_images(base: TrainingBase, images, prompt: str, resolution: int, role: str):
    """A ComfyUI IMAGE batch (B, H, W, C) → encoded training examples; `role` names the input."""
    if images is None or images.shape[0] == 0:
        raise TrainingError(f"{role}: no images connected")
    batch = [fit_image(images[i:i + 1].clone(), resolution) for i in range(images.shape[0])]
    return encode_examples(base.encoder, batch, prompt, base.device)


@dataclass
class ZipLoraNodeResult:
    merged: MergedLora
    loss_image: torch.Tensor   # ComfyUI IMAGE of the loss curve


def run_ziplora_node(model, clip, vae, content_lora: dict, subject_images, subject_prompt: str,
                     style_lora: dict, style_image, style_prompt: str, settings: ZipLoraSettings,
                     resolution: int, hooks: ComfyHooks, progress: StepProgress | None = None) -> ZipLoraNodeResult:
    content = lora_file_of(content_lora, "content LoRA")
    style = lora_file_of(style_lora, "style LoRA")
    with torch.inference_mode(False), torch.enable_grad():
        base = training_base(model, clip, vae, resolution, hooks)
        subjects = encode_images(base, subject_images, subject_prompt, resolution, "subject_images")
        styles = encode_images(base, style_image, style_prompt, resolution, "style_image")
        base.before_training()
        result = ziplora_merge(base.unet, base.denoise, base.schedule, content, style, subjects, styles,
                               settings, base.device, base.autocast_dtype, progress=progress,
                               check_interrupt=base.check_interrupt)
    series = {k: [(h["step"], h[k]) for h in result.history] for k in ("total", "content", "style")}
    title = (f"ZipLoRA {name_of(content_lora, 'content')} × {name_of(style_lora, 'style')}: "
             f"{settings.steps} steps, {result.seconds:.0f} s")
    return ZipLoraNodeResult(result.merged, plot.image_to_tensor(plot_curves(series, title=title)))


@dataclass
class TrainNodeResult:
    output: Path
    loss_image: torch.Tensor
    summary: str


def run_train_node(model, clip, vae, manifest: str, output_path: Path, run_dir: Path,
                   settings: TrainSettings, resolution: int, init: HyperNetwork | None, resume: bool,
                   overwrite: bool, hooks: ComfyHooks, progress: StepProgress | None = None) -> TrainNodeResult:
    """Train a hypernetwork from `manifest`, save it to `output_path`; logs/checkpoints in `run_dir`."""
    from PIL import Image

    if output_path.exists() and not (overwrite or resume):
        raise OutputExistsError(f"output_name: {output_path} exists; choose another name or enable overwrite")
    if not manifest.strip():
        raise TrainingError("manifest: give the path of a training manifest (.json or .yaml)")
    data = load_manifest(Path(manifest.strip()).expanduser())
    with torch.inference_mode(False), torch.enable_grad():
        base = training_base(model, clip, vae, resolution, hooks)
        check_loras(data, linear_layer_shapes(base.unet))
        trainer = Trainer(base, data, settings, run_dir, init_hypernet=init,
                          resume=run_dir if resume and (run_dir / "checkpoints").is_dir() else None)
        output_path.parent.mkdir(parents=True, exist_ok=True)
        result = trainer.run(output_path, force=True, progress=progress)
    with Image.open(result.plot_path) as im:
        image = plot.image_to_tensor(im.convert("RGB"))
    summary = f"saved {result.output} after {result.step} steps; log and checkpoints in {run_dir}"
    if result.validation:
        v = result.validation
        summary += (f"\nvalidation objective on {v['pairs']} held-out pairs: hypernetwork "
                    f"{v['hypernet']['total']:.5g}, plain sum {v['sum']['total']:.5g}")
    return TrainNodeResult(result.output, image, summary)
