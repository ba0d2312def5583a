"""Test-only node: records the weights a model actually uses at every model call of a sampling run.

It passes its MODEL through with one more ModelPatcher callback (ON_PREPARE_STATE), which runs
after the callbacks already on the model (K-LoRA's switcher among them) — i.e. with the weights
as the next model call will use them. For every call it keeps sigma, the model's timestep for
that sigma, and copies of the chosen weights; at the end of each sampling run (ON_CLEANUP) it
writes them to output/lorarar_testonly/<name>_<run>.safetensors (run 0, 1, … of this node's
model), calls numbered in order.
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

    def on_pre_run(self, patcher) -> None:
        self.calls = []

    def on_prepare_state(self, patcher, timestep) -> None:
        import comfy.utils

        sigma = timestep.reshape(-1)[:1]
        model_sampling = patcher.get_model_object("model_sampling")
        weights = {}
        for key in patcher.patches:
            if self.substring in key:
                weights[key] = comfy.utils.get_attr(patcher.model, key).detach().float().cpu().clone()
        self.calls.append({"sigma": float(sigma[0]), "timestep": float(model_sampling.timestep(sigma)[0]),
                           "weights": weights})

    def on_cleanup(self, patcher) -> None:
        import comfy.utils
        import folder_paths

        tensors, index = {}, []
        for number, call in enumerate(self.calls):
            index.append({"sigma": call["sigma"], "timestep": call["timestep"]})
            for key, value in call["weights"].items():
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
            switcher = getattr(callback, "__self__", None)
            if hasattr(switcher, "update_in_place"):
                switcher.update_in_place = bool(switch_in_place)
        recorder = Recorder(name, substring)
        out = model.clone()
        out.add_callback_with_key(CallbacksMP.ON_PRE_RUN, RECORD_KEY, recorder.on_pre_run)
        out.add_callback_with_key(CallbacksMP.ON_PREPARE_STATE, RECORD_KEY, recorder.on_prepare_state)
        out.add_callback_with_key(CallbacksMP.ON_CLEANUP, RECORD_KEY, recorder.on_cleanup)
        return io.NodeOutput(out)
