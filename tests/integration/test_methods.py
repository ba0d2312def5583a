"""NP-LoRA and K-LoRA in a real ComfyUI (skipped without COMFYUI_PATH; see conftest.py).

K-LoRA's MODEL changes its weights during sampling: a test-only node records, at every model
call, the weights the call is about to use; each must equal the base weight plus the side the
library's schedule chooses at that call's progress p (`MergedLora.delta_at`), for two samplers,
schedulers and a denoise < 1. Afterwards the sampling model is back at its p = 0 state and the
model passed in is bit-identical. NP-LoRA patches exactly the library's projected merge. The
merged_lora output of a K-LoRA merge explains, by method name, why it is not one LoRA.
"""

from __future__ import annotations

import pytest
import torch
from PIL import Image, ImageStat
from safetensors.torch import save_file

from hypernet import merge as merge_lib
from hypernet.lora import read_lora
from hypernet.tooling.synthetic import random_factors, to_state_dict
from tests.integration.comfy_support import dump, lora_shapes, model_key, read_record

pytestmark = [pytest.mark.comfyui, pytest.mark.slow]

TINY_SEED = 7
CONTENT_STRENGTH, STYLE_STRENGTH = 0.9, 1.1
# Content magnitude per layer (cycled), so that the switch points spread over the whole of sampling.
SPREAD = (0.3, 0.6, 0.8, 1.0, 1.2, 1.5, 1.9, 2.6)
RUNS = {  # name → KSampler settings
    "euler": {"steps": 8, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0},
    "dpmpp": {"steps": 6, "sampler_name": "dpmpp_2m", "scheduler": "karras", "denoise": 0.6},
}
BOUNDARY = 2e-3  # calls this close to a layer's switch point are not judged (interpolation rounding)








def loaders(files: dict) -> dict:
    return {
        "1": {"class_type": "LoraRarTestTinySDXL", "inputs": {"seed": TINY_SEED}},
        "2": {"class_type": "LoraRarLoadLora", "inputs": {"lora_name": files["content"]}},
        "3": {"class_type": "LoraRarLoadLora", "inputs": {"lora_name": files["style"]}},
    }


def merge_node(method: str, **extra) -> dict:
    return {"class_type": "LoraRarMerge", "inputs": {
        "model": ["1", 0], "clip": ["1", 1], "content_lora": ["2", 0], "style_lora": ["3", 0],
        "content_strength": CONTENT_STRENGTH, "style_strength": STYLE_STRENGTH, "method": method, **extra}}


def sampling_prompt(files: dict) -> dict:
    """K-LoRA → recorder → two samplers on the SAME model, the second refining the first one's
    latent (denoise < 1): the second run also starts from whatever the first left in the weights."""
    prompt = {
        **loaders(files),
        "4": merge_node("k-lora"),
        "5": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["4", 1], "text": "a sks dog in watercolor style"}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["4", 1], "text": "blurry"}},
        "7": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "8": {"class_type": "PreviewImage", "inputs": {"images": ["4", 3]}},
        "10": {"class_type": "LoraRarTestRecordWeights", "inputs": {"model": ["4", 0], "name": "klora", "substring": ".attn"}},
    }
    latent = ["7", 0]
    for index, (name, settings) in enumerate(RUNS.items()):
        sampler = str(11 + 2 * index)
        prompt[sampler] = {"class_type": "KSampler", "inputs": {
            "model": ["10", 0], "positive": ["5", 0], "negative": ["6", 0], "latent_image": latent,
            "seed": 3, "cfg": 2.0, **settings}}
        prompt[str(12 + 2 * index)] = {"class_type": "SaveLatent", "inputs": {
            "samples": [sampler, 0], "filename_prefix": f"latents/klora_{name}"}}
        latent = [sampler, 0]
    return prompt


def after_prompt(files: dict) -> dict:
    """The sampling model (the recorder's, from the cache) and the model passed in, dumped after
    sampling; the NP-LoRA merge patched and dumped; one more sampling run on the K-LoRA model with
    the switcher's GPU path (style weights computed from the weight in place), recorded."""
    settings = RUNS["euler"]
    return {
        **loaders(files),
        "4": merge_node("k-lora"),
        "10": {"class_type": "LoraRarTestRecordWeights", "inputs": {"model": ["4", 0], "name": "klora", "substring": ".attn"}},
        "20": merge_node("np-lora", mu=1.5, np_side="output"),
        "21": {"class_type": "LoraRarTestDumpWeights", "inputs": {"model": ["20", 0], "clip": ["20", 1], "name": "np_lora"}},
        "22": {"class_type": "PreviewImage", "inputs": {"images": ["20", 3]}},
        "40": {"class_type": "LoraRarTestDumpWeights", "inputs": {"model": ["10", 0], "name": "klora_sampler_after"}},
        "41": {"class_type": "LoraRarTestDumpWeights", "inputs": {"model": ["1", 0], "clip": ["1", 1], "name": "methods_base_after"}},
        "5": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["4", 1], "text": "a sks dog in watercolor style"}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["4", 1], "text": "blurry"}},
        "7": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "50": {"class_type": "LoraRarTestRecordWeights", "inputs": {
            "model": ["4", 0], "name": "klora_in_place", "substring": ".attn", "switch_in_place": True}},
        "51": {"class_type": "KSampler", "inputs": {
            "model": ["50", 0], "positive": ["5", 0], "negative": ["6", 0], "latent_image": ["7", 0],
            "seed": 5, "cfg": 2.0, **settings}},
        "52": {"class_type": "SaveLatent", "inputs": {"samples": ["51", 0], "filename_prefix": "latents/klora_in_place"}},
    }


def prepare(server):
    """The tiny model's base weights and the two LoRA files written into the server's loras."""
    server.run_prompt({
        "1": {"class_type": "LoraRarTestTinySDXL", "inputs": {"seed": TINY_SEED}},
        "2": {"class_type": "LoraRarTestDumpWeights", "inputs": {"model": ["1", 0], "clip": ["1", 1], "name": "methods_base_before"}},
    })
    base = dump(server, "methods_base_before")
    shapes = lora_shapes(base)
    content = random_factors(shapes, 4, seed=41)
    content = {n: (up * SPREAD[i % len(SPREAD)], down) for i, (n, (up, down)) in enumerate(content.items())}
    loras = server.base_dir / "models" / "loras"
    files = {"content": "methods_content.safetensors", "style": "methods_style.safetensors"}
    save_file(to_state_dict(content, "kohya", alpha=2.0), loras / files["content"])
    save_file(to_state_dict(random_factors(shapes, 6, seed=42), "kohya", alpha=6.0), loras / files["style"])
    return base, shapes, files


def k_lora_expected(server, files):
    loras = server.base_dir / "models" / "loras"
    c, s = read_lora(loras / files["content"]), read_lora(loras / files["style"])
    return merge_lib.merge(c, s, None, CONTENT_STRENGTH, STYLE_STRENGTH, "k-lora")


@pytest.fixture(scope="module")
def run(comfy_server):
    server = comfy_server
    base, shapes, files = prepare(server)
    loras = server.base_dir / "models" / "loras"
    sampling = server.run_prompt(sampling_prompt(files), timeout=600)
    after = server.run_prompt(after_prompt(files), timeout=600)
    c, s = read_lora(loras / files["content"]), read_lora(loras / files["style"])
    expected = {
        "k-lora": merge_lib.merge(c, s, None, CONTENT_STRENGTH, STYLE_STRENGTH, "k-lora"),
        "np-lora": merge_lib.merge(c, s, None, CONTENT_STRENGTH, STYLE_STRENGTH, "np-lora",
                                   params={"mu": 1.5, "side": "output"}),
    }
    return {"server": server, "outputs": {**sampling["outputs"], **after["outputs"]}, "base": base,
            "shapes": shapes, "files": files, "expected": expected}


@pytest.fixture(scope="module")
def per_cast_run(per_cast_server):
    """The same K-LoRA sampling prompt on a server whose K-LoRA models switch per cast."""
    server = per_cast_server
    base, _, files = prepare(server)
    server.run_prompt(sampling_prompt(files), timeout=600)
    return {"server": server, "base": base, "expected": {"k-lora": k_lora_expected(server, files)}}


@pytest.mark.parametrize("name", [*RUNS, "in place", *(f"per-cast {r}" for r in RUNS)])
def test_klora_weights_at_every_call_are_base_plus_the_scheduled_side(request, name):
    """Exchange backend (both samplers, and its GPU path on the CPU) and the per-cast backend
    (weight functions, what dynamic VRAM uses) — each call's weights as the library schedules."""
    run = request.getfixturevalue("per_cast_run" if name.startswith("per-cast") else "run")
    name = name.removeprefix("per-cast ")
    merged, base = run["expected"]["k-lora"], run["base"]
    if name == "in place":  # the switcher's GPU path, on the CPU
        calls, settings = read_record(run["server"], "klora_in_place_0"), RUNS["euler"]
    else:
        calls, settings = read_record(run["server"], f"klora_{list(RUNS).index(name)}"), RUNS[name]
    assert len(calls) >= settings["steps"], f"{len(calls)} model calls recorded for {settings['steps']} steps"
    switched = [n for n, p in merged.switch_points.items() if 0 < p < 1]
    assert len(switched) >= 20, merged.switch_points  # the content LoRA's spread worked
    roles_seen: dict[str, set[bool]] = {n: set() for n in switched}
    judged = 0
    for p, weights in calls:
        assert set(weights) >= set(merged.switch_points), "a switched layer was not recorded"
        for layer, weight in weights.items():
            if layer not in merged.layers:
                continue
            point = merged.switch_points.get(layer)
            if point is not None and abs(p - point) < BOUNDARY:
                continue
            expected = base[model_key(layer)] + merged.delta_at(layer, p).reshape(weight.shape)
            torch.testing.assert_close(weight, expected, rtol=1e-5, atol=1e-6,
                                       msg=lambda m, layer=layer, p=p: f"{layer} at p={p:.4f}: {m}")
            judged += 1
            if point is not None and layer in roles_seen:
                roles_seen[layer].add(p < point)
    assert judged > len(calls) * len(merged.switch_points) * 0.9
    both = [n for n, seen in roles_seen.items() if seen == {True, False}]
    assert both, "no layer was seen on both sides during sampling"
    if settings["denoise"] < 1:  # p follows the noise level, not the step count
        assert calls[0][0] > 0.2, calls[0][0]
    else:
        assert calls[0][0] < 0.01


def test_sampling_model_is_back_at_its_start_state_and_the_input_model_untouched(run):
    merged, base = run["expected"]["k-lora"], run["base"]
    after = dump(run["server"], "klora_sampler_after")
    for layer in merged.layers:
        if layer.startswith(("te1.", "te2.")):
            continue
        key = model_key(layer)
        torch.testing.assert_close(after[key], base[key] + merged.delta_at(layer, 0.0).reshape(base[key].shape),
                                   rtol=1e-5, atol=1e-6)
    other = dump(run["server"], "methods_base_after")
    assert other.keys() == base.keys()
    assert [k for k in base if not torch.equal(base[k], other[k])] == []


def test_np_lora_patches_exactly_the_library_projection(run):
    merged, base = run["expected"]["np-lora"], run["base"]
    patched = dump(run["server"], "np_lora")
    for layer in merged.layers:
        key = model_key(layer)
        torch.testing.assert_close(patched[key], base[key] + merged.delta(layer).reshape(base[key].shape),
                                   rtol=1e-5, atol=1e-6, msg=lambda m, layer=layer: f"{layer}: {m}")
    targeted = {model_key(n) for n in merged.layers}
    assert [k for k in base if k not in targeted and not torch.equal(patched[k], base[k])] == []
    assert len(merged.layers) == merged.report.method_layers == len(run["shapes"])


def test_plots_show_what_each_method_did(run):
    server, outputs = run["server"], run["outputs"]
    for node in ("8", "22"):
        image = outputs[node]["images"][0]
        with Image.open(server.base_dir / image["type"] / image["subfolder"] / image["filename"]) as picture:
            assert picture.width >= 800 and max(ImageStat.Stat(picture.convert("RGB")).stddev) > 10


@pytest.mark.parametrize("consumer", ["LoraRarSaveMergedLora", "LoraModelLoader"])
def test_klora_merged_lora_says_it_is_not_one_lora(run, consumer):
    files = run["files"]
    prompt = {
        **loaders(files),
        "4": {"class_type": "LoraRarMerge", "inputs": {
            "model": ["1", 0], "content_lora": ["2", 0], "style_lora": ["3", 0],
            "content_strength": 1.0, "style_strength": 1.0, "method": "k-lora"}},
    }
    if consumer == "LoraRarSaveMergedLora":
        prompt["5"] = {"class_type": consumer, "inputs": {"merged_lora": ["4", 2], "filename_prefix": "klora/no", "dtype": "fp32"}}
    else:
        prompt["5"] = {"class_type": consumer, "inputs": {"model": ["1", 0], "lora": ["4", 2], "strength_model": 1.0}}
        prompt["6"] = {"class_type": "LoraRarTestDumpWeights", "inputs": {"model": ["5", 0], "name": "klora_core_loader"}}
    if consumer == "LoraRarSaveMergedLora":  # ours says so on the node and lets the run go on
        text = run["server"].run_prompt(prompt)["outputs"]["5"]["text"][0]
        assert text.startswith("Nothing written:") and "switches between the two LoRAs during sampling" in text, text
    else:  # core's loader reads the dict, which explains itself in the error
        error = run["server"].run_prompt_expecting_error(prompt)
        assert error["node_type"] == consumer
        message = error["exception_message"]
        assert "k-lora merge switches between the two LoRAs during sampling" in message, message
    assert not (run["server"].base_dir / "models" / "loras" / "klora").exists()
