"""Test-only node: records the weights a model actually uses at every model call of a sampling run.

It passes its MODEL through with one more ModelPatcher callback (ON_PREPARE_STATE), which runs
after the callbacks already on the model (K-LoRA's switcher among them). A weight a model call
uses is what ComfyUI's `comfy.ops.cast_bias_weight` returns for that module — the stored weight
with low-VRAM patches, dynamic-VRAM patches and weight functions applied (where a K-LoRA model
switching per cast adds the side in use) — or, for a module that does not cast (a weight patched
at load, no functions), the stored weight itself. So during sampling the recorder wraps
`comfy.ops.cast_bias_weight` (every ComfyUI op calls it through that module's globals) and keeps,
per call, the first weight each recorded module was cast to; modules that did not cast keep the
stored weight seen before the call. This is what the model computed with, under every ComfyUI
loading mode, dynamic VRAM on a GPU included.

For every call it keeps sigma, the model's timestep for that sigma, and copies of the chosen
weights (float32); at the end of each sampling run (ON_CLEANUP) it writes them to
output/lorarar_testonly/<name>_<run>.safetensors (run 0, 1, … of this node's model), calls
numbered in order. The callbacks take both of ComfyUI's call forms (`(patcher, timestep)` before
May 2026, `(patcher, timestep, model_options)` after).
"""

from __future__ import annotations

import json
import os

from comfy_api.latest import io

RECORD_KEY = "lorarar_testonly_record"


class Recorder:
    def __init__(self, name: str, substring: str):
        self.name, self.substring = name, substring
        self.calls: list[dict] = []
        self.runs = 0
        self._modules: dict[int, str] = {}   # id(module) → weight key, for the cast wrapper
        self._original_cast = None

    def on_pre_run(self, patcher, *_) -> None:
        import comfy.ops
        import comfy.utils

        self.calls = []
        keys = set(patcher.patches) | set(getattr(patcher, "weight_wrapper_patches", {}))
        self._modules = {id(comfy.utils.get_attr(patcher.model, key.rsplit(".", 1)[0])): key
                         for key in keys if self.substring in key and key.endswith(".weight")}
        if self._original_cast is None:
            original = self._original_cast = comfy.ops.cast_bias_weight

            def recording_cast(s, *args, **kwargs):
                result = original(s, *args, **kwargs)
                key = self._modules.get(id(s))
                if key is not None and self.calls and key not in self.calls[-1]["cast"]:
                    self.calls[-1]["cast"][key] = result[0].detach().float().cpu().clone()
                return result

            comfy.ops.cast_bias_weight = recording_cast

    def on_prepare_state(self, patcher, timestep, *_) -> None:
        import comfy.utils

        sigma = timestep.reshape(-1)[:1]
        model_sampling = patcher.get_model_object("model_sampling")
        stored = {key: comfy.utils.get_attr(patcher.model, key).detach().float().cpu().clone()
                  for key in self._modules.values()}
        self.calls.append({"sigma": float(sigma[0]), "timestep": float(model_sampling.timestep(sigma)[0]),
                           "weights": stored, "cast": {}})

    def on_cleanup(self, patcher, *_) -> None:
        import comfy.ops
        import comfy.utils
        import folder_paths

        if self._original_cast is not None:
            comfy.ops.cast_bias_weight = self._original_cast
            self._original_cast = None
        tensors, index = {}, []
        for number, call in enumerate(self.calls):
            index.append({"sigma": call["sigma"], "timestep": call["timestep"], "cast": sorted(call["cast"])})
            for key, value in {**call["weights"], **call["cast"]}.items():
                tensors[f"{number}/{key}"] = value
        folder = os.path.join(folder_paths.get_output_directory(), "lorarar_testonly")
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, f"{self.name}_{self.runs}.safetensors")
        self.runs += 1
        comfy.utils.save_torch_file(tensors, path + ".tmp", metadata={"calls": json.dumps(index)})
        os.replace(path + ".tmp", path)


class LoraRarTestRecordWeights(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LoraRarTestRecordWeights",
            display_name="Record weights during sampling (LoRA.rar tests)",
            category="LoRA.rar/testing",
            inputs=[
                io.Model.Input("model", tooltip="Model to pass through, recorded while it samples."),
                io.String.Input("name", default="record", tooltip="File name (no extension) under output/lorarar_testonly."),
                io.String.Input("substring", default=".attn", tooltip="Record the patched weights whose key contains this."),
                io.Boolean.Input("switch_in_place", default=False, optional=True,
                                 tooltip="Make the model's K-LoRA switcher compute style weights from the weight in "
                                         "place (its GPU path) also on the CPU."),
            ],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(cls, model, name, substring, switch_in_place=False) -> io.NodeOutput:
        from comfy.patcher_extension import CallbacksMP

        for callback in model.get_all_callbacks(CallbacksMP.ON_PREPARE_STATE):
            backend = getattr(getattr(callback, "__self__", None), "backend", None)
            if hasattr(backend, "update_in_place"):
                backend.update_in_place = bool(switch_in_place)
        recorder = Recorder(name, substring)
        out = model.clone()
        out.add_callback_with_key(CallbacksMP.ON_PRE_RUN, RECORD_KEY, recorder.on_pre_run)
        out.add_callback_with_key(CallbacksMP.ON_PREPARE_STATE, RECORD_KEY, recorder.on_prepare_state)
        out.add_callback_with_key(CallbacksMP.ON_CLEANUP, RECORD_KEY, recorder.on_cleanup)
        return io.NodeOutput(out)
