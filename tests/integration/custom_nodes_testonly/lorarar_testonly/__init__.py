"""Test-only ComfyUI node pack for the LoRA.rar integration tests. NOT part of the shipped pack.

The integration fixture copies this folder into a throw-away ComfyUI base directory next to
the real pack. It gives a prompt a tiny SDXL-topology MODEL + CLIP without checkpoint files,
and an output node that writes a model's *patched* weights to a safetensors file, so the test
can compare what ComfyUI actually applied with the library's merged ΔW.
"""

from __future__ import annotations

import json
import os

from comfy_api.latest import ComfyExtension, io


class LoraRarTestTinySDXL(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LoraRarTestTinySDXL",
            display_name="Tiny SDXL-topology model (LoRA.rar tests)",
            category="LoRA.rar/testing",
            inputs=[io.Int.Input("seed", default=0, min=0, max=2**31 - 1,
                                 tooltip="Seed of the random weights."),
                    io.Int.Input("channels", default=32, min=16, max=320, step=16, optional=True,
                                 tooltip="UNet model channels (widths 2x and 4x this); SDXL: 320."),
                    io.Combo.Input("dtype", options=["fp32", "fp16", "bf16"], default="fp32", optional=True,
                                   tooltip="Storage dtype of the UNet weights.")],
            outputs=[io.Model.Output(), io.Clip.Output(), io.Vae.Output()],
        )

    @classmethod
    def execute(cls, seed, channels=32, dtype="fp32") -> io.NodeOutput:
        import torch

        from .tiny_sdxl import build_clip, build_model, build_vae

        kind = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
        return io.NodeOutput(build_model(seed, channels, kind), build_clip(seed), build_vae(seed))


class LoraRarTestDumpWeights(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LoraRarTestDumpWeights",
            display_name="Dump patched weights (LoRA.rar tests)",
            category="LoRA.rar/testing",
            inputs=[
                io.Model.Input("model", tooltip="Model whose patched UNet weights are written."),
                io.Clip.Input("clip", optional=True, tooltip="Text encoders to write as well."),
                io.String.Input("name", default="dump", tooltip="File name (no extension) under output/lorarar_testonly."),
            ],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, model, name, clip=None) -> io.NodeOutput:
        import comfy.model_management
        import comfy.utils
        import folder_paths

        tensors = {}
        dynamic = getattr(model, "is_dynamic", lambda: False)()
        if dynamic and model.patches:
            raise RuntimeError("a dynamic-VRAM model applies its patches only when a weight is cast; record "
                               "its weights during sampling (LoraRarTestRecordWeights) instead")
        # The same route core's "Extract and Save Lora" takes: load with patches forced in,
        # then read the live weights (dynamic VRAM refuses forcing; an unpatched model's
        # stored weights are its weights).
        comfy.model_management.load_models_gpu([model], force_patch_weights=not dynamic)
        for key, value in model.model_state_dict(filter_prefix="diffusion_model.").items():
            tensors["unet." + key[len("diffusion_model."):]] = value.detach().float().cpu().clone()
        if clip is not None:
            comfy.model_management.load_models_gpu([clip.patcher], force_patch_weights=True)
            for key, value in clip.patcher.model_state_dict().items():
                if torch_is_float(value):
                    tensors["clip." + key] = value.detach().float().cpu().clone()
        # What ComfyUI holds per weight: how many patches, of which kind (one per merged weight
        # is what the pack's merge node promises where ComfyUI has weight adapters)
        kinds = {}
        for prefix, patcher in (("unet", model), ("clip", clip.patcher if clip is not None else None)):
            if patcher is None:
                continue
            for key, entries in patcher.patches.items():
                kinds[f"{prefix}.{key}"] = [type(entry[1]).__name__ for entry in entries]
        folder = os.path.join(folder_paths.get_output_directory(), "lorarar_testonly")
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, f"{name}.safetensors")
        comfy.utils.save_torch_file(tensors, path + ".tmp", metadata={"patch_kinds": json.dumps(kinds)})
        os.replace(path + ".tmp", path)
        return io.NodeOutput()


def torch_is_float(value) -> bool:
    import torch

    return torch.is_floating_point(value)


class LoraRarTestExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        from .record_weights import LoraRarTestRecordWeights

        return [LoraRarTestTinySDXL, LoraRarTestDumpWeights, LoraRarTestRecordWeights]


async def comfy_entrypoint() -> LoraRarTestExtension:
    return LoraRarTestExtension()
