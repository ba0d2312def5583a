"""The example workflows (ComfyUI templates) are structurally sound — no ComfyUI needed.

Every link must join existing nodes and slots of matching types, every node type must be one
of ours or a core node, and every widget value must be valid for the node's schema. Schemas
come from tests/data/example_workflow_schemas.json, a snapshot of the real server's
/object_info that the integration test keeps honest (test_schema_snapshot_matches_live_server).
The same checks run against a real frontend in tests/integration/test_browser.py.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
from PIL import Image

from tests.integration.comfy_support import FILE_COMBOS, SCHEMA_SNAPSHOT, pack_node_ids_in_source

REPO = Path(__file__).resolve().parents[1]
WORKFLOWS = sorted((REPO / "example_workflows").glob("*.json"))
# Core nodes the examples may use besides ours (the brief: core nodes only). Note is the
# frontend's own comment node; it is never sent to the server.
CORE_TYPES = {"CheckpointLoaderSimple", "CLIPTextEncode", "EmptyLatentImage", "KSampler",
              "VAEDecode", "SaveImage", "PreviewImage", "ImageBatch", "PreviewAny"}
FRONTEND_TYPES = {"Note": ["STRING"], "MarkdownNote": ["STRING"]}
WIDGET_KINDS = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
SEED_CONTROL = {"fixed", "increment", "decrement", "randomize"}
MODEL_FILE = re.compile(r"^[\w./ -]+\.(safetensors|pth)$")
# LoraRarMerge's widgets: content_strength, style_strength, method, then (appended later, optional)
# the methods' settings.
METHOD_WIDGET = 2
SECRET = re.compile(r"(sk-[A-Za-z0-9]{16,}|api[_-]?key|Bearer\s+\S{10,})", re.IGNORECASE)


@pytest.fixture(scope="module")
def schemas() -> dict:
    return json.loads(SCHEMA_SNAPSHOT.read_text())


def load(path: Path) -> dict:
    return json.loads(path.read_text())


def test_there_are_the_documented_examples():
    assert {p.stem for p in WORKFLOWS} >= {"LoRA.rar merge, subject and style (SDXL)", "LoRA.rar compare, plain sum vs hypernetwork",
                                           "LoRA.rar compare, all merge methods"}


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_thumbnail_next_to_workflow(path):
    thumb = path.with_suffix(".jpg")
    assert thumb.is_file(), f"template thumbnail {thumb.name} is missing"
    with Image.open(thumb) as image:
        assert image.format == "JPEG" and image.width >= 400


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_ui_format_header(path):
    wf = load(path)
    assert wf["version"] == 0.4
    ids = [n["id"] for n in wf["nodes"]]
    assert len(ids) == len(set(ids)), "duplicate node ids"
    assert wf["last_node_id"] >= max(ids)
    assert wf["last_link_id"] >= max((link[0] for link in wf["links"]), default=0)
    for node in wf["nodes"]:
        assert len(node["pos"]) == 2 and len(node["size"]) == 2 and node["size"][0] > 0


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_links_join_existing_slots_of_matching_type(path):
    wf = load(path)
    nodes = {n["id"]: n for n in wf["nodes"]}
    link_ids = set()
    for link_id, origin, origin_slot, target, target_slot, link_type in wf["links"]:
        link_ids.add(link_id)
        assert origin in nodes and target in nodes, f"link {link_id} joins missing nodes"
        out = nodes[origin]["outputs"][origin_slot]
        inp = nodes[target]["inputs"][target_slot]
        assert link_id in (out.get("links") or []), f"link {link_id} not listed on its output"
        assert inp["link"] == link_id, f"link {link_id} not set on its input"
        # an input of type "*" (core's Preview Any) takes any type; the link then carries "*"
        assert out["type"] == inp["type"] == link_type or (inp["type"] == link_type == "*"), \
            (link_id, out["type"], inp["type"], link_type)
    # …and the reverse: every link a slot names exists.
    for node in wf["nodes"]:
        for inp in node.get("inputs", []):
            assert inp.get("link") is None or inp["link"] in link_ids
        for out in node.get("outputs", []):
            assert set(out.get("links") or []) <= link_ids


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_node_types_are_ours_or_core(path, schemas):
    ours = pack_node_ids_in_source()
    for node in load(path)["nodes"]:
        kind = node["type"]
        assert kind in ours | CORE_TYPES | set(FRONTEND_TYPES), f"node {node['id']}: {kind} is not ours or core"
        assert kind in schemas or kind in FRONTEND_TYPES, f"{kind} missing from the schema snapshot"


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_required_sockets_connected(path, schemas):
    for node in load(path)["nodes"]:
        if node["type"] in FRONTEND_TYPES:
            continue
        connected = {i["name"] for i in node.get("inputs", []) if i.get("link") is not None}
        for section, name, kind, _ in schemas[node["type"]]["inputs"]:
            if section == "required" and kind not in WIDGET_KINDS:
                assert name in connected, f"node {node['id']} ({node['type']}): {name} is not connected"


def expected_widgets(schema: dict) -> list[tuple[str, str, dict]]:
    """(name, kind, options) in the order the frontend stores widgets_values."""
    return [(name, kind, options) for name, kind, options, _ in widgets_with_sections(schema)]


def widgets_with_sections(schema: dict) -> list[tuple[str, str, dict, str]]:
    out = []
    for section, name, kind, options in schema["inputs"]:
        if kind in WIDGET_KINDS:
            out.append((name, kind, options, section))
            if options.get("control_after_generate"):
                out.append(("control_after_generate", "CONTROL", {}, section))
    return out


def check_value(name: str, kind: str, options: dict, value) -> str | None:
    """An error message, or None when `value` is valid for the widget."""
    if kind == "INT":
        if not isinstance(value, int) or isinstance(value, bool):
            return f"{name}={value!r} is not an integer"
        if not options.get("min", -math.inf) <= value <= options.get("max", math.inf):
            return f"{name}={value} outside [{options.get('min')}, {options.get('max')}]"
        step = options.get("step")
        if step and (value - options.get("min", 0)) % step:
            return f"{name}={value} not a multiple of step {step}"
    elif kind == "FLOAT":
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            return f"{name}={value!r} is not a number"
        if not options.get("min", -math.inf) <= value <= options.get("max", math.inf):
            return f"{name}={value} outside [{options.get('min')}, {options.get('max')}]"
    elif kind == "BOOLEAN":
        if not isinstance(value, bool):
            return f"{name}={value!r} is not a boolean"
    elif kind == "STRING":
        if not isinstance(value, str):
            return f"{name}={value!r} is not a string"
    elif kind == "CONTROL":
        if value not in SEED_CONTROL:
            return f"control_after_generate={value!r} not one of {sorted(SEED_CONTROL)}"
    elif kind == "COMBO":
        if name in FILE_COMBOS:
            if not isinstance(value, str) or not MODEL_FILE.match(value) or ".." in value:
                return f"{name}={value!r} is not a model file name"
        elif value not in options.get("options", []):
            return f"{name}={value!r} not one of {options.get('options')}"
    return None


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_widget_values_valid(path, schemas):
    errors = []
    for node in load(path)["nodes"]:
        values = node.get("widgets_values", [])
        if node["type"] in FRONTEND_TYPES:
            widgets = [("text", "STRING", {})]
            appended = []
        else:
            widgets = expected_widgets(schemas[node["type"]])
            appended = [w for w in widgets_with_sections(schemas[node["type"]])[len(values):]]
        # A workflow saved before optional widgets were appended to a node stores fewer values;
        # the frontend gives the new ones their defaults. Anything else is a broken workflow.
        if len(values) > len(widgets) or (len(values) < len(widgets)
                                          and any(section != "optional" for *_, section in appended)):
            errors.append(f"node {node['id']} ({node['type']}): {len(values)} widget values, "
                          f"schema has {[w[0] for w in widgets]}")
            continue
        for (name, kind, options), value in zip(widgets, values):
            if (message := check_value(name, kind, options, value)) is not None:
                errors.append(f"node {node['id']} ({node['type']}): {message}")
    assert errors == []


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_no_secrets_and_relative_outputs(path):
    text = path.read_text()
    assert not SECRET.search(text), "something that looks like a secret is in the workflow"
    for node in load(path)["nodes"]:
        if node["type"] in ("SaveImage", "LoraRarSaveMergedLora"):
            prefix = node["widgets_values"][0]
            assert not prefix.startswith("/") and ".." not in prefix


def test_comparison_workflow_uses_one_seed_for_both_methods(schemas):
    wf = load(REPO / "example_workflows" / "LoRA.rar compare, plain sum vs hypernetwork.json")
    merges = [n for n in wf["nodes"] if n["type"] == "LoraRarMerge"]
    assert sorted(n["widgets_values"][METHOD_WIDGET] for n in merges) == ["lorarar", "sum"]
    samplers = [n for n in wf["nodes"] if n["type"] == "KSampler"]
    assert len(samplers) == 2
    assert samplers[0]["widgets_values"] == samplers[1]["widgets_values"]
    assert samplers[0]["widgets_values"][1] == "fixed"  # same seed on every run, not re-rolled
    assert any(n["type"] == "ImageBatch" for n in wf["nodes"])


def test_merge_node_widgets_only_ever_grow_at_the_end(schemas):
    """Saved workflows store widget values by position: the widgets of old workflows keep their
    places, and everything added since is optional (an old API prompt lacks it)."""
    widgets = widgets_with_sections(schemas["LoraRarMerge"])
    assert [name for name, *_ in widgets[:3]] == ["content_strength", "style_strength", "method"]
    assert [name for name, *_ in widgets[3:]] == ["mu", "np_rank", "np_side", "k_top_k", "k_alpha", "k_beta"]
    assert all(section == "optional" for *_, section in widgets[3:])
    assert widgets[METHOD_WIDGET][2]["options"] == ["lorarar", "np-lora", "k-lora", "sum"]


def _source_of(wf: dict, node_id: int, input_name: str) -> dict:
    """The node whose output feeds `input_name` of node `node_id`."""
    nodes = {n["id"]: n for n in wf["nodes"]}
    link_id = next(i["link"] for i in nodes[node_id]["inputs"] if i["name"] == input_name)
    origin = next(link[1] for link in wf["links"] if link[0] == link_id)
    return nodes[origin]


def test_all_methods_workflow_labels_each_image_with_its_method():
    """One pair through every method with one seed; following the links from the grid back
    through the Batch Images chain, image k comes from the merge whose method is label k."""
    wf = load(REPO / "example_workflows" / "LoRA.rar compare, all merge methods.json")
    merges = [n for n in wf["nodes"] if n["type"] == "LoraRarMerge"]
    methods = [n["widgets_values"][METHOD_WIDGET] for n in merges]
    assert sorted(methods) == sorted(["lorarar", "np-lora", "k-lora", "sum"])
    samplers = [n for n in wf["nodes"] if n["type"] == "KSampler"]
    assert len(samplers) == 4 and all(s["widgets_values"] == samplers[0]["widgets_values"] for s in samplers)
    assert samplers[0]["widgets_values"][1] == "fixed"
    grid = next(n for n in wf["nodes"] if n["type"] == "LoraRarLabelledGrid")
    labels = [label.strip() for label in grid["widgets_values"][0].split(",")]

    def images_of(node: dict) -> list[str]:  # the method of every image in this node's output, in order
        if node["type"] == "ImageBatch":
            return images_of(_source_of(wf, node["id"], "image1")) + images_of(_source_of(wf, node["id"], "image2"))
        assert node["type"] == "VAEDecode", node["type"]
        sampler = _source_of(wf, node["id"], "samples")
        merge = _source_of(wf, sampler["id"], "model")
        # …and the sampler's prompts were encoded with that merge's clip
        for name in ("positive", "negative"):
            assert _source_of(wf, _source_of(wf, sampler["id"], name)["id"], "clip")["id"] == merge["id"]
        return [merge["widgets_values"][METHOD_WIDGET]]

    assert images_of(_source_of(wf, grid["id"], "images")) == labels
    save = next(n for n in wf["nodes"] if n["type"] == "SaveImage")
    assert _source_of(wf, save["id"], "images")["id"] == grid["id"]


def test_widget_checker_rejects_bad_values():
    """Control: the checker can fail."""
    assert check_value("steps", "INT", {"min": 1, "max": 10000}, 0) is not None
    assert check_value("width", "INT", {"min": 16, "max": 16384, "step": 8}, 1001) is not None
    assert check_value("cfg", "FLOAT", {"min": 0.0, "max": 100.0}, float("nan")) is not None
    assert check_value("method", "COMBO", {"options": ["lorarar", "sum"]}, "avg") is not None
    assert check_value("lora_name", "COMBO", {}, "../../etc/passwd") is not None
    assert check_value("lora_name", "COMBO", {}, "../x.safetensors") is not None
    assert check_value("download", "BOOLEAN", {}, "false") is not None
    assert check_value("steps", "INT", {"min": 1, "max": 10000}, 30) is None


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_model_download_metadata(path):
    """Load Checkpoint names its file's public download (the frontend's missing-models dialog
    offers it); nothing else carries a URL — the hypernetwork's licence-aware download is the
    Load Hypernetwork node's own `download` switch."""
    wf = load(path)
    urls = 0
    for node in wf["nodes"]:
        for model in node.get("properties", {}).get("models", []):
            urls += 1
            assert node["type"] == "CheckpointLoaderSimple", node["type"]
            assert model["name"] == node["widgets_values"][0]
            assert model["directory"] == "checkpoints"
            assert model["url"].startswith("https://huggingface.co/") and model["url"].endswith("/" + model["name"])
    assert urls == 1
    assert path.read_text().count("http") == urls
