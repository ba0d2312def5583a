"""Integration tests against a real, newest ComfyUI server (see conftest.py; skipped without
COMFYUI_PATH).

The prompt merges two synthetic LoRAs (written at the tiny SDXL-topology model's shapes) with
a small hypernetwork of ours, samples one step, and dumps the weights ComfyUI actually patched
into the model and text encoders. Those must equal the base weights plus the library's merged
ΔW, and the base model must be bit-identical before and after.
"""

from __future__ import annotations

import json
import os
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageStat
from safetensors.torch import load_file, save_file

from hypernet import merge as merge_lib
from hypernet.lora import read_lora
from hypernet.model import HypernetConfig, HyperNetwork, save_hypernet
from hypernet.tooling.synthetic import random_factors, to_state_dict
from tests.integration.comfy_support import (
    PACK_FOLDER,
    REPO,
    SCHEMA_SNAPSHOT,
    dump,
    import_failures,
    lora_shapes,
    model_key,
    pack_node_ids_in_source,
    schema_snapshot,
    ui_to_api,
)

pytestmark = [pytest.mark.comfyui, pytest.mark.slow]

OUR_CATEGORY = "LoRA.rar"
CONTENT_STRENGTH, STYLE_STRENGTH = 1.0, 0.8
TINY_SEED = 7
PLANNED_NODES = {"LoraRarLoadLora", "LoraRarLoadHypernet", "LoraRarMerge", "LoraRarSaveMergedLora"}


@pytest.fixture(scope="module")
def object_info(comfy_server):
    return comfy_server.get_json("/object_info", timeout=60)


def pack_nodes(object_info: dict) -> set[str]:
    """Node IDs ComfyUI loaded from this pack's folder."""
    return {k for k, v in object_info.items() if v.get("python_module") == f"custom_nodes.{PACK_FOLDER}"}


def test_pack_imports_without_failure(comfy_server):
    log = comfy_server.log_text()
    assert import_failures(log) == []
    # The pack was really loaded from custom_nodes (not silently skipped).
    assert "ComfyUI-LoRA-rar" in log


def test_object_info_lists_every_node_of_the_pack(object_info):
    ours = pack_nodes(object_info)
    declared = pack_node_ids_in_source()
    assert PLANNED_NODES <= declared, f"planned nodes missing from nodes/: {PLANNED_NODES - declared}"
    assert declared - ours == set(), f"declared in nodes/ but not served by ComfyUI: {declared - ours}"
    assert ours - declared == set(), f"served but not found in nodes/*.py: {ours - declared}"
    for node_id in ours:
        assert node_id.startswith("LoraRar"), node_id
        info = object_info[node_id]
        assert info["category"].startswith(OUR_CATEGORY), (node_id, info["category"])
        name = info["display_name"]
        assert name.endswith("(LoRA.rar)") or name.startswith("LoRA.rar"), (node_id, name)


def test_every_input_of_every_node_has_a_tooltip(object_info):
    missing = []
    for node_id in pack_nodes(object_info):
        info = object_info[node_id]
        for section in ("required", "optional"):
            for name, spec in info["input"].get(section, {}).items():
                options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
                if not str(options.get("tooltip", "")).strip():
                    missing.append(f"{node_id}.{name}")
    assert missing == [], f"inputs without a tooltip: {missing}"


def test_merge_node_inputs_match_documented_api(object_info):
    merge = object_info["LoraRarMerge"]
    inputs = {**merge["input"]["required"], **merge["input"].get("optional", {})}
    assert {"model", "content_lora", "style_lora", "content_strength", "style_strength",
            "method"} <= set(inputs)
    assert inputs["content_lora"][0] == "LORA_MODEL" and inputs["style_lora"][0] == "LORA_MODEL"
    assert merge["output"][:4] == ["MODEL", "CLIP", "LORA_MODEL", "IMAGE"]
    method = inputs["method"]
    options = method[1].get("options") if method[0] == "COMBO" else method[0]
    assert set(options) == {"lorarar", "np-lora", "k-lora", "sum"}


# ---------------------------------------------------------------------------------------------
# The merge prompt








def merge_prompt(hypernet_file: str, content_file: str, style_file: str) -> dict:
    tiny = ["1", 0]

    def merge_node(method):
        return {"class_type": "LoraRarMerge", "inputs": {
            "model": tiny, "clip": ["1", 1], "content_lora": ["2", 0], "style_lora": ["3", 0],
            "hypernetwork": ["4", 0], "content_strength": CONTENT_STRENGTH,
            "style_strength": STYLE_STRENGTH, "method": method}}

    return {
        "1": {"class_type": "LoraRarTestTinySDXL", "inputs": {"seed": TINY_SEED}},
        "2": {"class_type": "LoraRarLoadLora", "inputs": {"lora_name": content_file}},
        "3": {"class_type": "LoraRarLoadLora", "inputs": {"lora_name": style_file}},
        "4": {"class_type": "LoraRarLoadHypernet", "inputs": {"hypernet_name": hypernet_file, "download": False}},
        "5": merge_node("lorarar"),
        "6": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["5", 1], "text": "a sks dog in watercolor style"}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["5", 1], "text": "blurry"}},
        "8": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "9": {"class_type": "KSampler", "inputs": {
            "model": ["5", 0], "positive": ["6", 0], "negative": ["7", 0], "latent_image": ["8", 0],
            "seed": 1, "steps": 1, "cfg": 2.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "10": {"class_type": "SaveLatent", "inputs": {"samples": ["9", 0], "filename_prefix": "latents/lorarar_test"}},
        "11": {"class_type": "LoraRarTestDumpWeights", "inputs": {"model": ["5", 0], "clip": ["5", 1], "name": "patched_lorarar"}},
        "12": merge_node("sum"),
        "13": {"class_type": "LoraRarTestDumpWeights", "inputs": {"model": ["12", 0], "clip": ["12", 1], "name": "patched_sum"}},
        "14": {"class_type": "LoraRarSaveMergedLora", "inputs": {"merged_lora": ["5", 2], "filename_prefix": "lorarar_test/merged", "dtype": "fp32"}},
        "15": {"class_type": "PreviewImage", "inputs": {"images": ["5", 3]}},
        "16": {"class_type": "LoraRarTestDumpWeights", "inputs": {"model": tiny, "clip": ["1", 1], "name": "base_during"}},
    }


class CachedDeltas:
    """A MergedLora whose dense ΔW per layer is computed once (several checks compare it)."""

    def __init__(self, merged):
        self.merged, self.layers, self.report = merged, merged.layers, merged.report
        self._deltas = {}

    def delta(self, name):
        if name not in self._deltas:
            self._deltas[name] = self.merged.delta(name)
        return self._deltas[name]


@pytest.fixture(scope="module")
def merge_run(comfy_server):
    """Runs: base dump → merge prompt → base dump again; returns what the checks need."""
    server = comfy_server
    server.run_prompt({
        "1": {"class_type": "LoraRarTestTinySDXL", "inputs": {"seed": TINY_SEED}},
        "2": {"class_type": "LoraRarTestDumpWeights", "inputs": {"model": ["1", 0], "clip": ["1", 1], "name": "base_before"}},
    })
    base = dump(server, "base_before")
    shapes = lora_shapes(base)
    assert len(shapes) > 100, f"tiny model exposes too few LoRA targets: {len(shapes)}"

    loras = server.base_dir / "models" / "loras"
    content_path, style_path = loras / "lorarar_test_content.safetensors", loras / "lorarar_test_style.safetensors"
    # Different ranks on purpose (the merge must not assume equal ranks), alpha ≠ rank for one.
    save_file(to_state_dict(random_factors(shapes, 4, seed=11), "kohya", alpha=2.0), content_path)
    save_file(to_state_dict(random_factors(shapes, 6, seed=12), "kohya"), style_path)
    torch.manual_seed(0)
    hypernet = HyperNetwork(HypernetConfig(hidden=16, widths=(64, 128), name="tiny-test"))
    hyper_path = save_hypernet(hypernet, server.base_dir / "models" / "lorarar" / "lorarar_tiny_test.safetensors")

    entry = server.run_prompt(merge_prompt(hyper_path.name, content_path.name, style_path.name), timeout=600)
    server.run_prompt({
        "1": {"class_type": "LoraRarTestTinySDXL", "inputs": {"seed": TINY_SEED}},
        "2": {"class_type": "LoraRarTestDumpWeights", "inputs": {"model": ["1", 0], "clip": ["1", 1], "name": "base_after"}},
    })
    content, style = read_lora(content_path), read_lora(style_path)
    # What the library says the node must have applied (computed once: the checks share it).
    expected = {method: CachedDeltas(merge_lib.merge(content, style, hypernet if method == "lorarar" else None,
                                                     CONTENT_STRENGTH, STYLE_STRENGTH, method=method))
                for method in ("lorarar", "sum")}
    return {"server": server, "history": entry, "base": base, "shapes": shapes, "expected": expected,
            "files": {"content": content_path.name, "style": style_path.name, "hypernet": hyper_path.name}}


def assert_patched_equals(base, patched, merged, label):
    checked, worst = 0, 0.0
    for name in merged.layers:
        key = model_key(name)
        assert key in patched, f"{label}: merged layer {name} has no weight {key} in the model"
        delta = merged.delta(name).reshape(base[key].shape)
        expected = base[key] + delta
        err = (patched[key] - expected).abs().max().item()
        scale = delta.abs().max().item()
        worst = max(worst, err / max(scale, 1e-12))
        assert torch.allclose(patched[key], expected, rtol=1e-5, atol=1e-6), \
            f"{label}: {name} differs from base + library ΔW by {err:.3g} (ΔW max {scale:.3g})"
        checked += 1
    untouched = [k for k in base if k not in {model_key(n) for n in merged.layers}]
    for key in untouched:
        assert torch.equal(patched[key], base[key]), f"{label}: {key} changed but no LoRA targets it"
    return checked, worst


def test_lorarar_merge_patches_exactly_the_library_delta(merge_run):
    run = merge_run
    merged = run["expected"]["lorarar"]
    assert merged.report.method_layers > 0
    checked, _ = assert_patched_equals(run["base"], dump(run["server"], "patched_lorarar"), merged, "lorarar")
    assert checked == len(run["shapes"])
    assert any(n.startswith("te2.") for n in merged.layers)  # the text encoders were covered too


def test_each_merged_weight_gets_one_patch(merge_run):
    """Issue 12 §3: one ComfyUI patch per merged weight (a weight adapter that adds the
    concatenated factors' product), where two stacked LoRA loaders add two."""
    from safetensors import safe_open

    path = merge_run["server"].base_dir / "output" / "lorarar_testonly" / "patched_lorarar.safetensors"
    with safe_open(str(path), "pt") as f:
        kinds = json.loads(f.metadata()["patch_kinds"])
    merged = merge_run["expected"]["lorarar"]
    assert len(kinds) == len(merged.layers), (len(kinds), len(merged.layers))
    assert all(entries == ["MergedLayerPatch"] for entries in kinds.values()), sorted(kinds.items())[:3]


def test_sum_merge_patches_the_plain_sum(merge_run):
    run = merge_run
    merged = run["expected"]["sum"]
    checked, _ = assert_patched_equals(run["base"], dump(run["server"], "patched_sum"), merged, "sum")
    assert checked == len(run["shapes"])


def test_lorarar_and_sum_differ_on_hypernet_layers(merge_run):
    patched_l = dump(merge_run["server"], "patched_lorarar")
    patched_s = dump(merge_run["server"], "patched_sum")
    key = model_key("input_blocks.4.1.transformer_blocks.0.attn1.to_q")
    assert not torch.allclose(patched_l[key], patched_s[key])
    key = model_key("input_blocks.4.1.transformer_blocks.0.attn1.to_k")  # summed in both
    assert torch.allclose(patched_l[key], patched_s[key], rtol=1e-6, atol=1e-7)


def test_base_model_untouched_by_the_merge(merge_run):
    base = merge_run["base"]
    for name in ("base_during", "base_after"):
        other = dump(merge_run["server"], name)
        assert other.keys() == base.keys()
        changed = [k for k in base if not torch.equal(base[k], other[k])]
        assert changed == [], f"{name}: base weights changed: {changed[:5]}"


def test_one_sampling_step_ran_and_outputs_were_written(merge_run):
    server = merge_run["server"]
    latents = sorted((server.base_dir / "output" / "latents").glob("lorarar_test*.latent"))
    assert latents, "SaveLatent wrote nothing: KSampler did not run"
    samples = load_file(latents[-1])["latent_tensor"]
    assert samples.shape == (1, 4, 8, 8) and torch.isfinite(samples).all()
    outputs = merge_run["history"]["outputs"]
    previews = outputs.get("15", {}).get("images")
    assert previews, "coefficient plot was not previewed"
    plot = server.base_dir / previews[0]["type"] / previews[0]["subfolder"] / previews[0]["filename"]
    with Image.open(plot) as image:  # a drawn chart, not an empty or one-colour canvas
        assert image.width >= 200 and image.height >= 100
        assert max(ImageStat.Stat(image.convert("RGB")).stddev) > 10


def test_saved_merged_lora_equals_library_merge(merge_run):
    server = merge_run["server"]
    written = sorted((server.base_dir / "models" / "loras" / "lorarar_test").glob("merged_*.safetensors"))
    assert written, "Save Merged LoRA wrote no file under models/loras/lorarar_test"
    saved = read_lora(written[-1])
    merged = merge_run["expected"]["lorarar"]
    assert set(saved.layers) == set(merged.layers)
    for name in merged.layers:
        torch.testing.assert_close(saved.layers[name].delta(), merged.delta(name), rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------------------------------------
# Example workflows as ComfyUI templates


def example_workflows() -> list[Path]:
    return sorted((REPO / "example_workflows").glob("*.json"))


def test_example_workflows_are_served_as_templates(comfy_server):
    listing = comfy_server.get_json("/api/workflow_templates")
    assert sorted(listing.get(PACK_FOLDER, [])) == sorted(p.stem for p in example_workflows())
    for path in example_workflows():
        # the names say what each template does (spaces, a comma): URL-quoted, as a browser sends them
        served = comfy_server.get_json(f"/api/workflow_templates/{PACK_FOLDER}/{urllib.parse.quote(path.name)}")
        assert served == json.loads(path.read_text())
        jpeg = urllib.parse.quote(f"{path.stem}.jpg")
        with urllib.request.urlopen(f"{comfy_server.url}/api/workflow_templates/{PACK_FOLDER}/{jpeg}") as resp:
            assert resp.headers["Content-Type"] == "image/jpeg" and len(resp.read()) > 5000


def test_schema_snapshot_matches_live_server(object_info):
    """tests/data/example_workflow_schemas.json lets the unit test check widget values without
    ComfyUI; it must describe the live nodes. LORARAR_UPDATE_SCHEMAS=1 rewrites it."""
    types = {n["type"] for p in example_workflows() for n in json.loads(p.read_text())["nodes"]}
    types = {t for t in types if t in object_info}  # frontend-only nodes (Note) have no schema
    live = schema_snapshot(object_info, types)
    if os.environ.get("LORARAR_UPDATE_SCHEMAS") == "1":
        SCHEMA_SNAPSHOT.parent.mkdir(parents=True, exist_ok=True)
        SCHEMA_SNAPSHOT.write_text(json.dumps(live, indent=1, sort_keys=True) + "\n")
    stored = json.loads(SCHEMA_SNAPSHOT.read_text())
    stale = ("tests/data/example_workflow_schemas.json is stale; rerun with LORARAR_UPDATE_SCHEMAS=1 "
             "(against the oldest tested ComfyUI) and review the diff")
    assert stored.keys() == live.keys(), stale
    ours = {t for t in live if t.startswith("LoraRar")}
    assert {t: stored[t] for t in ours} == {t: live[t] for t in ours}, stale
    # Core nodes of a newer ComfyUI may offer more choices (new samplers); everything a saved
    # workflow relies on — inputs by position, their kinds, the stored choices — must stay.
    for node_type in live.keys() - ours:
        assert core_schema_compatible(stored[node_type], live[node_type]), f"{node_type}: {stale}"


def core_schema_compatible(stored: dict, live: dict) -> bool:
    # outputs may be appended (2026's Preview Any passes its text on), never changed or removed
    if live["outputs"][:len(stored["outputs"])] != stored["outputs"] or len(stored["inputs"]) != len(live["inputs"]):
        return False
    for (section, name, kind, options), (l_section, l_name, l_kind, l_options) in zip(stored["inputs"], live["inputs"]):
        if (section, name, kind) != (l_section, l_name, l_kind):
            return False
        rest, l_rest = dict(options), dict(l_options)
        choices, l_choices = rest.pop("options", []), l_rest.pop("options", [])
        if rest != l_rest or not set(choices) <= set(l_choices):
            return False
    return True


def tiny_version(prompt: dict, files: dict) -> dict:
    """An example workflow's API prompt made runnable here: the checkpoint loader becomes the
    tiny SDXL-topology model (same MODEL/CLIP/VAE outputs), the LoRA and hypernetwork names
    point at the test's files, one sampling step on a 64×64 image. All wiring stays as saved."""
    prompt = json.loads(json.dumps(prompt))
    for node in prompt.values():
        kind, inputs = node["class_type"], node["inputs"]
        if kind == "CheckpointLoaderSimple":
            node["class_type"], node["inputs"] = "LoraRarTestTinySDXL", {"seed": TINY_SEED}
        elif kind == "LoraRarLoadLora":
            inputs["lora_name"] = files["style" if "style" in inputs["lora_name"] else "content"]
        elif kind == "LoraRarLoadHypernet":
            inputs["hypernet_name"] = files["hypernet"]
        elif kind == "KSampler":
            inputs["steps"] = 1
        elif kind == "EmptyLatentImage":
            inputs["width"] = inputs["height"] = 64
    return prompt


@pytest.mark.parametrize("workflow", example_workflows(), ids=lambda p: p.stem)
def test_example_workflow_runs_end_to_end(merge_run, object_info, workflow):
    server = merge_run["server"]
    data = json.loads(workflow.read_text())
    prompt = tiny_version(ui_to_api(data, object_info), merge_run["files"])
    assert {n["class_type"] for n in prompt.values()} >= {"LoraRarMerge", "KSampler", "SaveImage"}
    entry = server.run_prompt(prompt, timeout=600)
    saves = [i for i, n in prompt.items() if n["class_type"] == "SaveImage"]
    for node_id in saves:
        images = entry["outputs"][node_id]["images"]
        batch = sum(1 for n in prompt.values() if n["class_type"] == "KSampler")
        gridded = prompt[node_id]["inputs"]["images"][0] in {
            i for i, n in prompt.items() if n["class_type"] == "LoraRarLabelledGrid"}
        # the comparison saves sum + lorarar as one batch; the all-methods one saves one labelled grid
        assert len(images) == (1 if gridded else batch)
        for image in images:
            assert (server.base_dir / "output" / image["subfolder"] / image["filename"]).is_file()
    plots = [i for i, n in prompt.items() if n["class_type"] == "PreviewImage"]
    assert plots and all(entry["outputs"][i]["images"] for i in plots)


# ---------------------------------------------------------------------------------------------
# What a user sees when something is wrong (the message ComfyUI shows on the failed node)


def merge_to_file_prompt(files: dict, hypernet_name: str, method: str = "lorarar") -> dict:
    return {
        "1": {"class_type": "LoraRarTestTinySDXL", "inputs": {"seed": TINY_SEED}},
        "2": {"class_type": "LoraRarLoadLora", "inputs": {"lora_name": files["content"]}},
        "3": {"class_type": "LoraRarLoadLora", "inputs": {"lora_name": files["style"]}},
        "4": {"class_type": "LoraRarLoadHypernet", "inputs": {"hypernet_name": hypernet_name, "download": False}},
        "5": {"class_type": "LoraRarMerge", "inputs": {
            "model": ["1", 0], "content_lora": ["2", 0], "style_lora": ["3", 0], "hypernetwork": ["4", 0],
            "content_strength": 1.0, "style_strength": 1.0, "method": method}},
        "6": {"class_type": "LoraRarSaveMergedLora", "inputs": {
            "merged_lora": ["5", 2], "filename_prefix": "lorarar_test/errors", "dtype": "fp16"}},
    }


def test_missing_official_hypernet_says_where_to_put_it(merge_run):
    if (REPO / "weights" / "lorarar_sdxl_hypernet.pth").exists():
        pytest.skip("the official checkpoint sits in the pack's weights/ here, so it is not missing")
    error = merge_run["server"].run_prompt_expecting_error(
        merge_to_file_prompt(merge_run["files"], "lorarar_sdxl_hypernet.pth"))
    assert error["node_type"] == "LoraRarLoadHypernet"
    message = error["exception_message"]
    assert "lorarar_sdxl_hypernet.pth" in message and "download" in message
    assert str(merge_run["server"].base_dir / "models" / "lorarar") in message
    assert "CC BY-NC-SA" in message


def test_hypernet_for_other_widths_is_refused_clearly(merge_run):
    server = merge_run["server"]
    torch.manual_seed(1)
    path = server.base_dir / "models" / "lorarar" / "lorarar_sdxl_shaped_test.safetensors"
    save_hypernet(HyperNetwork(HypernetConfig(hidden=8, widths=(640, 1280), name="sdxl-shaped")), path, force=True)
    error = server.run_prompt_expecting_error(
        merge_to_file_prompt(merge_run["files"], "lorarar_sdxl_shaped_test.safetensors"))
    assert error["node_type"] == "LoraRarMerge", error["exception_message"]
    assert "640/1280" in error["exception_message"] and "64" in error["exception_message"]
    # The same files with method=sum need no hypernetwork and go through.
    ok = merge_to_file_prompt(merge_run["files"], "lorarar_sdxl_shaped_test.safetensors", method="sum")
    server.run_prompt(ok)


def test_merge_report_output_names_left_out_layers(merge_run):
    """Issue 9: a layer the reader cannot place shows on the node (its `report` output, read here
    through core's Preview Any), not only in the server log."""
    server, files = merge_run["server"], merge_run["files"]
    loras = server.base_dir / "models" / "loras"
    state = load_file(str(loras / files["content"]))
    state["lora_unet_some_unknown_block_0.lora_up.weight"] = torch.zeros(8, 4)
    state["lora_unet_some_unknown_block_0.lora_down.weight"] = torch.zeros(4, 8)
    save_file(state, str(loras / "content_with_unknown_key.safetensors"))
    prompt = merge_to_file_prompt({**files, "content": "content_with_unknown_key.safetensors"}, files["hypernet"],
                                  method="sum")
    prompt["6"] = {"class_type": "PreviewAny", "inputs": {"source": ["5", 4]}}
    entry = server.run_prompt(prompt)
    text = entry["outputs"]["6"]["text"][0]
    assert text.startswith("method sum"), text
    assert "1 layer(s) of the content LoRA LEFT OUT" in text
    assert any(line.startswith("content LoRA:") and "not recognised" in line for line in text.splitlines()), text


# ---------------------------------------------------------------------------------------------
# The merged LoRA is an ordinary LoRA for core ComfyUI


def test_merged_lora_works_in_core_lora_nodes(merge_run, object_info):
    """merged_lora → core "Load LoRA Model" and "Save LoRA Weights"; the file written by Save
    Merged LoRA → core "Load LoRA" (LoraLoader). Each must patch exactly the library's merge."""
    server, files = merge_run["server"], merge_run["files"]
    saved = sorted((server.base_dir / "models" / "loras" / "lorarar_test").glob("merged_*.safetensors"))
    assert saved, "the merge prompt wrote no merged LoRA"
    prompt = merge_to_file_prompt(files, files["hypernet"])
    del prompt["6"]
    prompt.update({
        "7": {"class_type": "LoraModelLoader", "inputs": {"model": ["1", 0], "lora": ["5", 2], "strength_model": 1.0}},
        "8": {"class_type": "LoraRarTestDumpWeights", "inputs": {"model": ["7", 0], "name": "core_lora_model"}},
        # core's "Save LoRA Weights": SaveLoRANode until 2026, SaveLoRA since
        "9": {"class_type": "SaveLoRA" if "SaveLoRA" in object_info else "SaveLoRANode",
              "inputs": {"lora": ["5", 2], "prefix": "loras/lorarar_core_saved"}},
        "10": {"class_type": "LoraLoader", "inputs": {
            "model": ["1", 0], "clip": ["1", 1], "lora_name": f"lorarar_test/{saved[-1].name}",
            "strength_model": 1.0, "strength_clip": 1.0}},
        "11": {"class_type": "LoraRarTestDumpWeights", "inputs": {"model": ["10", 0], "clip": ["10", 1], "name": "core_lora_file"}},
    })
    prompt["5"]["inputs"]["style_strength"] = STYLE_STRENGTH
    server.run_prompt(prompt)
    merged, base = merge_run["expected"]["lorarar"], merge_run["base"]

    unet_only = dump(server, "core_lora_model")
    for name in merged.layers:
        if not name.startswith(("te1.", "te2.")):
            key = model_key(name)
            torch.testing.assert_close(unet_only[key], base[key] + merged.delta(name), rtol=1e-5, atol=1e-6)
    checked, _ = assert_patched_equals(base, dump(server, "core_lora_file"), merged, "core LoraLoader")
    assert checked == len(merge_run["shapes"])

    written = sorted((server.base_dir / "output" / "loras").glob("lorarar_core_saved*.safetensors"))
    assert written, "core Save LoRA Weights wrote nothing"
    again = read_lora(written[-1])
    assert set(again.layers) == set(merged.layers)


def test_changing_strengths_repatches_correctly(merge_run):
    """ComfyUI re-runs only the Merge node when a strength changes (the loaders are cached, and
    the node may keep the hypernetwork's coefficients): each run must still patch exactly the
    library's merge at the new strengths."""
    server, files = merge_run["server"], merge_run["files"]
    from hypernet.model import load_hypernet

    hypernet = load_hypernet(server.base_dir / "models" / "lorarar" / files["hypernet"])
    content = read_lora(server.base_dir / "models" / "loras" / files["content"])
    style = read_lora(server.base_dir / "models" / "loras" / files["style"])
    for content_strength, style_strength in ((1.2, 0.3), (0.5, -0.7)):
        prompt = merge_to_file_prompt(files, files["hypernet"])
        del prompt["6"]
        prompt["5"]["inputs"].update(content_strength=content_strength, style_strength=style_strength,
                                     clip=["1", 1])
        name = f"strengths_{content_strength}_{style_strength}"
        prompt["7"] = {"class_type": "LoraRarTestDumpWeights",
                       "inputs": {"model": ["5", 0], "clip": ["5", 1], "name": name}}
        entry = server.run_prompt(prompt)
        cached = {n for m in entry["status"]["messages"] if m[0] == "execution_cached" for n in m[1]["nodes"]}
        expected = merge_lib.merge(content, style, hypernet, content_strength, style_strength)
        checked, _ = assert_patched_equals(merge_run["base"], dump(server, name), expected, name)
        assert checked == len(merge_run["shapes"])
    # The second run changed nothing but strengths: the model and file loaders came from cache.
    assert {"1", "2", "3", "4"} <= cached, cached


# ---------------------------------------------------------------------------------------------
# An artist's first hour (what a walk-through in the browser found)

def test_save_shows_the_saved_path_and_how_to_see_it_in_the_loaders(merge_run):
    server, files = merge_run["server"], merge_run["files"]
    entry = server.run_prompt(merge_to_file_prompt(files, files["hypernet"], method="sum"))
    text = entry["outputs"]["6"]["text"][0]  # the node's own output; also sent as text on the node
    assert text.startswith("Saved models/loras/lorarar_test/errors_") and "Press R" in text, text
    written = text.split("Saved models/loras/", 1)[1].split("\n", 1)[0]
    assert (server.base_dir / "models" / "loras" / written).is_file()
    # the server lists it at once (the frontend re-reads the lists on R)
    listed = server.get_json("/object_info/LoraLoader")["LoraLoader"]["input"]["required"]["lora_name"]
    options = listed[0] if isinstance(listed[0], list) else listed[1]["options"]
    assert written in options


@pytest.mark.parametrize("case", ["k-lora", "both strengths 0"])
def test_save_writes_nothing_says_why_and_the_rest_of_the_workflow_runs(merge_run, case):
    """The main template with method k-lora (or both strengths 0) used to fail the whole run at
    Save Merged LoRA; now Save says why on the node, and the plot, report and sampling still run."""
    server, files = merge_run["server"], merge_run["files"]
    prompt = merge_to_file_prompt(files, files["hypernet"], method="k-lora" if case == "k-lora" else "sum")
    if case != "k-lora":
        prompt["5"]["inputs"].update(content_strength=0.0, style_strength=0.0)
    prompt["6"]["inputs"]["filename_prefix"] = f"lorarar_test/never_{case.replace(' ', '_')}"
    prompt.update({
        "7": {"class_type": "PreviewImage", "inputs": {"images": ["5", 3]}},
        "8": {"class_type": "PreviewAny", "inputs": {"source": ["5", 4]}},
        "9": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "a sks dog"}},
        "10": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "11": {"class_type": "KSampler", "inputs": {
            "model": ["5", 0], "positive": ["9", 0], "negative": ["9", 0], "latent_image": ["10", 0], "seed": 1,
            "steps": 1, "cfg": 1.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "12": {"class_type": "SaveLatent", "inputs": {"samples": ["11", 0], "filename_prefix": "latents/never"}},
    })
    entry = server.run_prompt(prompt)
    text = entry["outputs"]["6"]["text"][0]
    expected = "switches between the two LoRAs during sampling" if case == "k-lora" else "both strengths are 0"
    assert text.startswith("Nothing written:") and expected in text, text
    assert not list((server.base_dir / "models" / "loras" / "lorarar_test").glob(f"never_{case.replace(' ', '_')}*"))
    assert entry["outputs"]["7"]["images"] and "12" in entry["outputs"]
    report = entry["outputs"]["8"]["text"][0]
    if case != "k-lora":
        assert "both strengths are 0" in report, report


def test_merge_without_a_model_makes_a_merged_lora_file(merge_run):
    server, files = merge_run["server"], merge_run["files"]
    prompt = merge_to_file_prompt(files, files["hypernet"])
    del prompt["1"], prompt["5"]["inputs"]["model"]
    prompt["6"]["inputs"]["filename_prefix"] = "lorarar_test/no_model"
    prompt["7"] = {"class_type": "PreviewAny", "inputs": {"source": ["5", 4]}}
    entry = server.run_prompt(prompt)
    saved = list((server.base_dir / "models" / "loras" / "lorarar_test").glob("no_model_*.safetensors"))
    assert len(saved) == 1 and entry["outputs"]["7"]["text"][0].startswith("method lorarar")
    again = read_lora(saved[0])
    merged = merge_run["expected"]["lorarar"]
    assert set(again.layers) == set(merged.layers)
    # k-lora without a model: one clear error at the merge node
    prompt = merge_to_file_prompt(files, files["hypernet"], method="k-lora")
    del prompt["1"], prompt["5"]["inputs"]["model"]
    error = server.run_prompt_expecting_error(prompt)
    assert error["node_type"] == "LoraRarMerge"
    assert error["exception_message"].startswith("model: k-lora switches between the two LoRAs while the model samples")
    # the error's type reads short in ComfyUI (not the pack's folder path)
    assert error["exception_type"] == "LoRA.rar.LoraRarError", error["exception_type"]


def test_load_hypernetwork_lists_only_hypernetworks(merge_run, object_info):
    """The pack's weights/ folder holds the testbed's model, judges and LoRAs beside its small
    hypernetwork: only hypernetworks are offered (the official file name always, even when absent)."""
    server = merge_run["server"]
    junk = server.base_dir / "models" / "lorarar" / "not_a_hypernet.safetensors"
    save_file({"weight": torch.zeros(3)}, str(junk))
    live = server.get_json("/object_info/LoraRarLoadHypernet")["LoraRarLoadHypernet"]
    spec = live["input"]["required"]["hypernet_name"]
    options = spec[0] if isinstance(spec[0], list) else spec[1]["options"]
    assert options[0] == "lorarar_sdxl_hypernet.pth" and merge_run["files"]["hypernet"] in options
    assert "not_a_hypernet.safetensors" not in options
    from hypernet.catalog import PACK_WEIGHTS_DIR

    not_hypernets = tuple(p.name for p in (PACK_WEIGHTS_DIR / "testbed").glob("*.safetensors")
                          if p.name != "hypernet.safetensors")   # the base, judges, LoRAs of the demo
    assert {"base.safetensors", "judges.safetensors"} <= set(not_hypernets)
    assert not any(name.endswith(not_hypernets) for name in options), options
    assert "testbed/hypernet.safetensors" in options or any(o.endswith("hypernet.safetensors") for o in options)


def test_a_lora_with_nan_is_refused_at_its_loader_naming_the_file(merge_run):
    server, files = merge_run["server"], merge_run["files"]
    loras = server.base_dir / "models" / "loras"
    state = load_file(str(loras / files["content"]))
    key = next(k for k in state if k.endswith("lora_down.weight"))
    state[key] = state[key].clone()
    state[key][0, 0] = float("nan")
    save_file(state, str(loras / "poisoned.safetensors"))
    error = server.run_prompt_expecting_error(
        merge_to_file_prompt({**files, "content": "poisoned.safetensors"}, files["hypernet"], method="sum"))
    assert error["node_type"] == "LoraRarLoadLora"
    assert error["exception_message"].startswith("poisoned.safetensors: 1 layer(s) contain NaN or Inf values")
