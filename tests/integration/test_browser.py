"""The example workflows and the node help in the real ComfyUI frontend, driven in Debian's
headless Chromium by browser/drive.mjs, against every frontend in conftest.FRONTENDS: the one
ComfyUI pins (1.27.x for ComfyUI 0.3.64) and the newest from PyPI (1.58.x, when
LORARAR_NEWEST_FRONTEND names it). Test ids name the frontend, e.g. `[newest-1.58.1-…]`.

Each workflow file is opened as a user opens it (app.handleFile: Open, drag-and-drop), on two
machines: a bare one (the server has none of the model files the examples name) and an equipped
one (placeholder files of those names in models/…). What the frontend tells the user is read
from its own state (see frontendNotices in drive.mjs) and from the text that appears on screen:

- pinned 1.27 ("dialogs"): a modal "Missing Models" dialog for files declared with a download
  address in `properties.models` (our Load Checkpoint: SDXL base); nodes are not marked.
- newest 1.58 ("issues-panel"): no modal; every model-file widget whose value is not in its
  list is outlined red, an "N issues found" overlay opens, and "View details" lists the files
  under Missing Models (with Download where the workflow gives an address; our LoRAs, which only
  the user has, show as "Unknown" folder: no frontend API lets a pack map its node to a folder).

Either way: a user with the files sees nothing, a user without them is told about those files
and nothing else, no node type is ever missing, links are valid, and the API prompt the frontend
builds is what the server accepts. `LORARAR_UPDATE_THUMBNAILS=1` writes the pinned frontend's
canvas screenshots as the template thumbnails (example_workflows/<name>.jpg, docs/workflow.jpg);
`LORARAR_SCREENSHOTS=DIR` keeps every screenshot.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from PIL import Image, ImageStat

from tests.integration.comfy_support import FILE_COMBOS, PACK_FOLDER, REPO, ui_to_api
from tests.integration.conftest import FRONTENDS

pytestmark = [pytest.mark.comfyui, pytest.mark.browser, pytest.mark.slow]

BROWSER_DIR = Path(__file__).resolve().parent / "browser"
DRIVER = BROWSER_DIR / "drive.mjs"
WORKFLOWS = sorted((REPO / "example_workflows").glob("*.json"))
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
# Frontend-only nodes: never sent to the server.
VIRTUAL_TYPES = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}
# Where the file of each file combo lives (for the equipped machine's placeholders).
FOLDER_OF = {"ckpt_name": "checkpoints", "lora_name": "loras", "hypernet_name": "lorarar"}
assert set(FOLDER_OF) == FILE_COMBOS
BROKEN = "broken_unknown_node"  # control workflow: one node type nobody registers
# The main template as it was saved when LoRA.rar Merge's MODEL input was still required (its
# first slot); since it is optional, frontends put it after the required inputs.
SAVED_BEFORE = REPO / "tests" / "data" / "workflow_saved_before_optional_model.json"
UNKNOWN_TYPE = "LoraRarNoSuchNode"


@pytest.fixture(scope="session")
def driver_ready():
    if shutil.which("node") is None:
        pytest.skip("browser test skipped: Node.js (`node`) is not on PATH")
    if not Path(CHROMIUM).exists():
        pytest.skip(f"browser test skipped: Chromium not found at {CHROMIUM} "
                    "(apt-get install chromium, or set CHROMIUM)")
    if not (BROWSER_DIR / "node_modules" / "playwright-core").is_dir():
        pytest.skip("browser test skipped: playwright-core is not installed "
                    "(cd tests/integration/browser && npm ci)")
    return True


def drive(*args: str, timeout: float = 300) -> dict:
    proc = subprocess.run(["node", str(DRIVER), *args], cwd=BROWSER_DIR, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, "CHROMIUM": CHROMIUM})
    if proc.returncode != 0:
        pytest.fail(f"drive.mjs {args[0]} failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def keep_screenshots(folder: Path, label: str) -> None:
    keep = os.environ.get("LORARAR_SCREENSHOTS")
    if keep:
        shutil.copytree(folder, Path(keep) / label, dirs_exist_ok=True)


@pytest.fixture(scope="module", params=[pytest.param(f, id=f.id) for f in FRONTENDS])
def frontend(request):
    return request.param


@pytest.fixture(scope="module")
def server(frontend, driver_ready, request):
    if frontend.unavailable:  # before any server starts
        pytest.skip(frontend.unavailable)
    return request.getfixturevalue("frontend_server")(frontend)


@pytest.fixture(scope="module")
def object_info(server):
    return server.get_json("/object_info", timeout=120)


def schema_inputs(object_info: dict, node_type: str) -> set[str]:
    spec = object_info[node_type]["input"]
    return set(spec.get("required", {})) | set(spec.get("optional", {}))


def load(path: Path) -> dict:
    return json.loads(path.read_text())


def file_widgets(workflow: dict, object_info: dict) -> dict[str, tuple[str, str]]:
    """{node id: (input name, file name)} for every model-file widget of the workflow."""
    prompt = ui_to_api(workflow, object_info)
    return {node_id: (name, value) for node_id, node in prompt.items()
            for name, value in node["inputs"].items() if name in FILE_COMBOS}


def listed(object_info: dict, node_type: str, name: str) -> list[str]:
    spec = object_info[node_type]["input"]["required"][name]
    return spec[0] if isinstance(spec[0], list) else spec[1].get("options", [])


def absent_files(workflow: dict, object_info: dict) -> dict[str, str]:
    """{node id: file name} for the files the workflow names that the server does not list."""
    types = {str(n["id"]): n["type"] for n in workflow["nodes"]}
    return {node_id: value for node_id, (name, value) in file_widgets(workflow, object_info).items()
            if value not in listed(object_info, types[node_id], name)}


def declared_downloads(workflow: dict) -> dict[str, str]:
    """{file name: url} the workflow offers for download (properties.models and `models`)."""
    entries = list(workflow.get("models", []))
    for node in workflow["nodes"]:
        entries += node.get("properties", {}).get("models", [])
    return {m["name"]: m["url"] for m in entries if m.get("url")}


@contextlib.contextmanager
def placeholder_model_files(server, workflows, object_info):
    """Empty files named like every model file the workflows name and the server lacks, so
    the frontend sees what a user who has them sees. Removed afterwards (the same server runs
    the other integration tests)."""
    made = []
    try:
        for path in workflows:
            workflow = load(path)
            types = {str(n["id"]): n["type"] for n in workflow["nodes"]}
            for node_id, (name, value) in file_widgets(workflow, object_info).items():
                target = server.base_dir / "models" / FOLDER_OF[name] / value
                if value not in listed(object_info, types[node_id], name) and not target.exists():
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_bytes(b"")
                    made.append(target)
        yield made
    finally:
        for target in made:
            target.unlink(missing_ok=True)


@pytest.fixture(scope="module")
def checked(server, frontend, object_info, tmp_path_factory):
    """The bare machine: every example, then the control workflow with an unknown node."""
    assert WORKFLOWS, "example_workflows/ has no workflow"
    shots = tmp_path_factory.mktemp(f"shots-{frontend.id}-bare")
    broken = load(WORKFLOWS[0])
    broken["nodes"][1]["type"] = UNKNOWN_TYPE
    broken_path = shots / f"{BROKEN}.json"
    broken_path.write_text(json.dumps(broken))
    result = drive("check", server.url + "/", str(shots), *map(str, WORKFLOWS), str(broken_path), str(SAVED_BEFORE))
    keep_screenshots(shots, f"{frontend.id}-bare")
    return result


@pytest.fixture(scope="module")
def equipped(server, frontend, object_info, tmp_path_factory):
    """The equipped machine: the same examples with every model file present."""
    shots = tmp_path_factory.mktemp(f"shots-{frontend.id}-equipped")
    with placeholder_model_files(server, WORKFLOWS, object_info) as made:
        assert made, "the examples name no model file the test server lacks: nothing to equip"
        result = drive("check", server.url + "/", str(shots), *map(str, WORKFLOWS))
    keep_screenshots(shots, f"{frontend.id}-equipped")
    return result


def told_names(report: dict) -> list[str]:
    return sorted(m["name"] for m in report["notices"]["missingModels"])


@pytest.mark.parametrize("workflow", WORKFLOWS, ids=lambda p: p.stem)
def test_workflow_opens_with_every_node_known(checked, workflow):
    report = checked["reports"][workflow.stem]
    assert report["missingTypes"] == [], f"node types the frontend does not know: {report['missingTypes']}"
    assert report["notices"]["missingNodeTypes"] == []
    assert report["unregisteredLoaded"] == []
    assert report["loadedNodes"] == report["expectedNodes"]


def test_a_workflow_saved_before_the_model_input_became_optional_keeps_its_links(checked):
    """Users' saved workflows wire MODEL into the merge node's first slot; loading one in today's
    node (MODEL optional, listed after the required inputs) keeps every link, and the prompt the
    frontend builds still feeds the checkpoint's MODEL to the merge."""
    report = checked["reports"][SAVED_BEFORE.stem]
    assert report["missingTypes"] == [] and report["badLinks"] == [], report["badLinks"]
    assert report["loadedNodes"] == report["expectedNodes"] and "promptError" not in report
    saved = load(SAVED_BEFORE)
    checkpoint = str(next(n["id"] for n in saved["nodes"] if n["type"] == "CheckpointLoaderSimple"))
    merge = next(n for n in report["prompt"].values() if n["class_type"] == "LoraRarMerge")
    assert merge["inputs"]["model"] == [checkpoint, 0] and merge["inputs"]["clip"] == [checkpoint, 1]
    assert merge["inputs"]["method"] == "lorarar" and merge["inputs"]["content_strength"] == 1


@pytest.mark.parametrize("workflow", WORKFLOWS, ids=lambda p: p.stem)
def test_no_node_covers_another_once_loaded(checked, workflow):
    """Every node as this frontend draws it after loading — grown to fit its widgets, title bar
    included — shares no area with another: nothing a user must set is hidden under a node."""
    report = checked["reports"][workflow.stem]
    assert len(report["boxes"]) == report["loadedNodes"]
    assert report["overlaps"] == [], report["overlaps"]


@pytest.mark.parametrize("workflow", WORKFLOWS, ids=lambda p: p.stem)
def test_user_without_the_files_is_told_about_them_and_nothing_else(checked, object_info, workflow):
    report = checked["reports"][workflow.stem]
    notices = report["notices"]
    data = load(workflow)
    absent = absent_files(data, object_info)
    downloads = declared_downloads(data)
    assert notices["other"] == [], f"the frontend reports more than missing files: {notices['other']}"
    assert absent, "the bare server should lack the examples' model files"
    if notices["surface"] == "dialogs":
        # Only files the workflow declares with an address; the nodes stay unmarked.
        expected = {name for name in absent.values() if name in downloads}
        assert set(told_names(report)) == expected
        assert report["nodesWithErrors"] == []
    else:
        # Every model-file widget whose value the server does not list, outlined red.
        assert set(told_names(report)) == set(absent.values())
        types = {str(n["id"]): n["type"] for n in data["nodes"]}
        assert sorted(report["nodesWithErrors"]) == sorted(f"{i}:{types[i]}" for i in absent)
    for model in notices["missingModels"]:
        if model["name"] in downloads:
            assert model["url"] == downloads[model["name"]], f"{model['name']}: no download offered"
    on_screen = "\n".join(report["toldOnScreen"])
    for name in told_names(report):
        assert name in on_screen, f"{name} is reported but not shown: {report['toldOnScreen']}"


@pytest.mark.parametrize("workflow", WORKFLOWS, ids=lambda p: p.stem)
def test_user_with_the_files_sees_no_notice(equipped, workflow):
    report = equipped["reports"][workflow.stem]
    notices = report["notices"]
    assert report["missingTypes"] == []
    assert (notices["missingNodeTypes"], notices["missingModels"], notices["other"], notices["dialogs"]) \
        == ([], [], [], []), notices
    assert notices["errorOverlay"] is False
    assert report["nodesWithErrors"] == []
    alarming = [line for line in report["toldOnScreen"] if re.search(r"missing|issue|error", line, re.IGNORECASE)]
    assert alarming == []


def test_sdxl_checkpoint_is_offered_for_download(checked):
    """Load Checkpoint carries properties.models: both frontends offer SDXL base with its address."""
    report = checked["reports"]["LoRA.rar merge, subject and style (SDXL)"]
    offered = {m["name"]: m["url"] for m in report["notices"]["missingModels"]}
    assert offered.get("sd_xl_base_1.0.safetensors", "").startswith("https://huggingface.co/stabilityai/")
    assert any("Download" in line for line in report["toldOnScreen"]), report["toldOnScreen"]


def test_unknown_node_is_reported(checked):
    """Control: the checks can fail — a workflow with an unknown node type is caught, and the
    user is shown its name (dialog, or the Issues panel's Missing Node Packs)."""
    report = checked["reports"][BROKEN]
    assert report["missingTypes"] == [UNKNOWN_TYPE]
    assert report["notices"]["missingNodeTypes"] == [UNKNOWN_TYPE]
    # 1.2x names the type in its dialog, 1.5x in the Issues panel; 1.4x's Errors panel says
    # "Missing Node Packs (1)" and folds the name under "Unknown pack (1)"
    told = report["toldOnScreen"]
    assert UNKNOWN_TYPE in told or {"Missing Node Packs (1)", "Unknown pack (1)"} <= set(told), told


@pytest.mark.parametrize("workflow", WORKFLOWS, ids=lambda p: p.stem)
def test_workflow_links_valid_and_prompt_builds(checked, workflow):
    report = checked["reports"][workflow.stem]
    data = load(workflow)
    assert report["badLinks"] == [], f"broken or mistyped links: {report['badLinks']}"
    assert report["links"] == len(data["links"])
    assert "promptError" not in report, report.get("promptError")
    real_nodes = [n for n in data["nodes"] if n["type"] not in VIRTUAL_TYPES and n.get("mode", 0) == 0]
    assert report["promptNodes"] == len(real_nodes)
    for node_id, node in report["prompt"].items():
        for value in node["inputs"].values():
            if isinstance(value, list) and len(value) == 2 and isinstance(value[1], int):
                assert value[0] in report["prompt"], f"node {node_id} links to missing node {value[0]}"


@pytest.mark.parametrize("workflow", WORKFLOWS, ids=lambda p: p.stem)
def test_frontend_prompt_equals_python_conversion(checked, equipped, object_info, workflow):
    """test_server runs the examples through ui_to_api(); every frontend must agree with it,
    with and without the model files."""
    converted = ui_to_api(load(workflow), object_info)
    for result in (checked, equipped):
        # (a frontend-only widget, e.g. Preview Any's text box in 1.27, may ride along in the
        # prompt; the server ignores inputs its schema does not have, so they are left out here)
        frontend = {k: {"class_type": v["class_type"],
                        "inputs": {name: value for name, value in v["inputs"].items()
                                   if name in schema_inputs(object_info, v["class_type"])}}
                    for k, v in result["reports"][workflow.stem]["prompt"].items()}
        assert frontend == converted


@pytest.mark.parametrize("workflow", WORKFLOWS, ids=lambda p: p.stem)
def test_server_accepts_frontend_prompt_except_model_files(server, checked, workflow):
    """POST the frontend's API prompt: the real server validates every input (types, ranges,
    combo values). Only the model files a shared workflow names but cannot ship may fail."""
    prompt = checked["reports"][workflow.stem]["prompt"]
    status, answer = server.post_json("/prompt", {"prompt": prompt, "client_id": "browser-test"})
    if status == 200:  # every file present: nothing to check, but don't leave it queued
        server.post_json("/queue", {"delete": [answer["prompt_id"]]})
        return
    assert status == 400, answer
    other = []
    for node_id, node_error in answer.get("node_errors", {}).items():
        for err in node_error["errors"]:
            name = err.get("extra_info", {}).get("input_name")
            if not (err["type"] == "value_not_in_list" and name in FILE_COMBOS):
                other.append((node_id, node_error["class_type"], err["type"], name, err.get("details")))
    assert other == [], f"server validation errors beyond missing model files: {other}"
    assert answer["node_errors"], f"rejected without node errors: {answer}"


def test_templates_open_from_the_template_browser(server, object_info):
    """Browse Templates → Custom Nodes → ComfyUI-LoRA-rar → each card loads its workflow; the
    user is told about absent model files only."""
    result = drive("template", server.url + "/", PACK_FOLDER, *[p.stem for p in WORKFLOWS])
    for workflow in WORKFLOWS:
        assert result["cards"][workflow.stem], f"no template card for {workflow.stem}"
        loaded = result["loaded"][workflow.stem]
        data = load(workflow)
        assert loaded["types"] == sorted(n["type"] for n in data["nodes"])
        notices = loaded["notices"]
        assert notices["missingNodeTypes"] == [] and notices["other"] == [], notices
        assert {m["name"] for m in notices["missingModels"]} <= set(absent_files(data, object_info).values())


def test_no_page_errors_from_our_nodes(checked, equipped):
    # The frontend logs 404s for optional user files and for API routes this ComfyUI lacks, and
    # refused internet look-ups (offline); anything thrown that names our pack is a failure.
    for result in (checked, equipped):
        assert result["frontendVersion"], "the page is not the ComfyUI frontend"
        ours = [e for e in result["consoleErrors"]
                if not e.startswith("Failed to load resource") and ("LoraRar" in e or "lorarar" in e.lower())
                and UNKNOWN_TYPE not in e]
        assert ours == []


def test_page_is_the_frontend_we_meant(checked, frontend):
    if frontend.version:
        assert checked["frontendVersion"] == frontend.version


@pytest.mark.parametrize("workflow", WORKFLOWS, ids=lambda p: p.stem)
def test_screenshot_shows_the_graph(equipped, frontend, workflow):
    shot = Path(equipped["reports"][workflow.stem]["screenshot"])
    with Image.open(shot) as image:
        assert image.width >= 800 and image.height >= 500
        # A drawn graph has contrast; an empty canvas or a blank page does not.
        assert max(ImageStat.Stat(image.convert("L")).stddev) > 10
        if os.environ.get("LORARAR_UPDATE_THUMBNAILS") == "1" and frontend.role == "pinned":
            save_jpeg(image, workflow.with_suffix(".jpg"), width=1200, quality=85)
            if workflow.stem == "LoRA.rar merge, subject and style (SDXL)":
                save_jpeg(image, REPO / "docs" / "workflow.jpg", width=960, quality=78)


# --- node help panel -------------------------------------------------------------------------

HELP_DOCS = REPO / "web" / "docs"


def help_needle(node_id: str) -> str:
    """The first sentence of the page's introduction as the panel renders it (markdown
    emphasis and code marks gone, whitespace collapsed)."""
    text = (HELP_DOCS / f"{node_id}.md").read_text(encoding="utf-8")
    intro = text.split("\n## ", 1)[0].split("\n", 1)[1]
    plain = re.sub(r"[*`]", "", " ".join(intro.split()))
    return plain.split(". ")[0][:80]


@pytest.fixture(scope="module")
def help_shown(server, frontend, tmp_path_factory):
    shots = tmp_path_factory.mktemp(f"shots-{frontend.id}-help")
    needles = shots / "needles.json"
    needles.write_text(json.dumps({p.stem: help_needle(p.stem) for p in sorted(HELP_DOCS.glob("*.md"))}))
    result = drive("help", server.url + "/", str(shots), str(needles))
    keep_screenshots(shots, f"{frontend.id}-help")
    return result["shown"]


@pytest.mark.parametrize("node_id", sorted(p.stem for p in HELP_DOCS.glob("*.md")))
def test_help_panel_shows_our_page(help_shown, node_id):
    """Select the node, open its help (Node Library help page on 1.2x, the right-side panel's
    Info tab on 1.3x+): the panel must show our page, not the one-line description."""
    shown = help_shown[node_id]
    assert shown["how"] != "not registered", f"{node_id} is not registered in the frontend"
    assert shown["found"], f"{node_id}: the help panel ({shown['how']}) does not show web/docs/{node_id}.md"


def save_jpeg(image: Image.Image, path: Path, width: int, quality: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rgb = image.convert("RGB")
    if rgb.width > width:
        rgb = rgb.resize((width, round(rgb.height * width / rgb.width)), Image.LANCZOS)
    tmp = path.with_suffix(".tmp.jpg")
    rgb.save(tmp, "JPEG", quality=quality, optimize=True)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------
# A run, as the user sees it: what the nodes say after pressing Run

@pytest.fixture(scope="module")
def run_files(server):
    """Two LoRAs and a hypernetwork for the tiny test model, in this server's folders."""
    import torch
    from safetensors.torch import save_file

    from hypernet.model import HypernetConfig, HyperNetwork, save_hypernet
    from hypernet.tooling.synthetic import random_factors, to_state_dict
    from tests.integration.comfy_support import dump, lora_shapes

    server.run_prompt({"1": {"class_type": "LoraRarTestTinySDXL", "inputs": {"seed": 7}},
                       "2": {"class_type": "LoraRarTestDumpWeights", "inputs": {"model": ["1", 0], "name": "browser_base"}}})
    shapes = {n: s for n, s in lora_shapes(dump(server, "browser_base")).items() if not n.startswith("te")}
    loras = server.base_dir / "models" / "loras"
    names = {"content": "browser_subject.safetensors", "style": "browser_style.safetensors",
             "hypernet": "browser_hypernet.safetensors"}
    save_file(to_state_dict(random_factors(shapes, 4, 1), "kohya", alpha=4.0), loras / names["content"])
    save_file(to_state_dict(random_factors(shapes, 4, 2), "kohya", alpha=4.0), loras / names["style"])
    torch.manual_seed(0)
    save_hypernet(HyperNetwork(HypernetConfig(hidden=8, widths=(64, 128))), server.base_dir / "models" / "lorarar" / names["hypernet"])
    return names


def run_spec(names: dict, method: str, hypernet: str) -> dict:
    return {"nodes": [
        {"key": "tiny", "type": "LoraRarTestTinySDXL", "pos": [0, 0], "widgets": {"seed": 7}},
        {"key": "content", "type": "LoraRarLoadLora", "pos": [0, 200], "widgets": {"lora_name": names["content"]}},
        {"key": "style", "type": "LoraRarLoadLora", "pos": [0, 320], "widgets": {"lora_name": names["style"]}},
        {"key": "hyper", "type": "LoraRarLoadHypernet", "pos": [0, 440], "widgets": {"hypernet_name": hypernet, "download": False}},
        {"key": "merge", "type": "LoraRarMerge", "pos": [380, 0], "widgets": {"method": method}},
        {"key": "save", "type": "LoraRarSaveMergedLora", "pos": [780, 0], "widgets": {"filename_prefix": f"browser/{method}"}},
        {"key": "report", "type": "PreviewAny", "pos": [780, 200], "size": [400, 200]},
        {"key": "saved", "type": "PreviewAny", "pos": [780, 440], "size": [400, 120], "title": "Saved LoRA"},
    ], "links": [["tiny", "MODEL", "merge", "model"], ["content", "lora", "merge", "content_lora"],
                 ["style", "lora", "merge", "style_lora"], ["hyper", "hypernetwork", "merge", "hypernetwork"],
                 ["merge", "merged_lora", "save", "merged_lora"], ["merge", "report", "report", "source"],
                 ["save", "saved", "saved", "source"]]}


@pytest.mark.parametrize("case", ["saved", "k-lora", "missing hypernetwork"])
def test_a_run_tells_the_user_on_the_nodes(server, frontend, run_files, tmp_path, case):
    """Pressed Run in the real frontend: Save Merged LoRA shows where the file went (and that R
    lists it); with k-lora it says why nothing was written and the run succeeds; an error names
    its short type (LoRA.rar.HypernetError), never the pack's folder path, and its message."""
    method = {"saved": "sum", "k-lora": "k-lora", "missing hypernetwork": "lorarar"}[case]
    hypernet = "lorarar_sdxl_hypernet.pth" if case == "missing hypernetwork" else run_files["hypernet"]
    if case == "missing hypernetwork" and (REPO / "weights" / hypernet).exists():
        pytest.skip("the official checkpoint sits in the pack's weights/ here")
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps(run_spec(run_files, method, hypernet)))
    result = drive("run", server.url + "/", str(tmp_path), str(spec))
    keep_screenshots(tmp_path, f"{frontend.id}-run-{case.replace(' ', '-')}")
    # what stays readable after the run: the Save node's `saved` output in a Preview Any; the
    # node's own text box too where the frontend keeps it (1.2x-1.4x; 1.5x clears it at the end)
    shown = result["texts"].get("Saved LoRA", "")
    on_node = result["texts"].get("Save Merged LoRA (LoRA.rar)")
    if case == "saved":
        assert result["status"] == "success", result["errors"]
        assert shown.startswith("Saved models/loras/browser/sum_") and "Press R" in shown, result["texts"]
    elif case == "k-lora":
        assert result["status"] == "success", result["errors"]
        assert shown.startswith("Nothing written:") and "switches between the two LoRAs" in shown, result["texts"]
    else:
        assert result["status"] == "error" and result["errors"][0]["exception_type"] == "LoRA.rar.HypernetError"
        screen = "\n".join(result["toldOnScreen"])
        # never the pack's module path; the message itself, first (1.27's dialog shows the message
        # alone, 1.4x "LoRA.rar.HypernetError: <message>"); 1.5x keeps it for its error panel
        assert "ComfyUI-LoRA-rar.hypernet" not in screen, screen
        held = result["frontendError"]
        if "is not installed" not in screen:
            assert held and held["type"] == "LoRA.rar.HypernetError", (screen, held)
            assert "hypernetwork lorarar-sdxl" in held["message"] and "is not installed" in held["message"]
    if on_node is not None and case != "missing hypernetwork":
        assert on_node == shown
