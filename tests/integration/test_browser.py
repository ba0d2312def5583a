"""The example workflows in the real ComfyUI frontend (comfyui-frontend-package served by the
real server of conftest.py), driven in Debian's headless Chromium by browser/drive.mjs.

Each workflow is opened through the app's own loader (`app.loadGraphData`, what Open and
drag-and-drop call); no node may be missing, no missing-nodes dialog may open, every link must
be type-valid, `app.graphToPrompt()` must succeed, and the server must accept the resulting
API prompt apart from the model files a shared workflow cannot carry.

`LORARAR_UPDATE_THUMBNAILS=1` also writes the canvas screenshots as the template thumbnails
(example_workflows/<name>.jpg) and docs/workflow.jpg.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from PIL import Image, ImageStat

from tests.integration.comfy_support import FILE_COMBOS, PACK_FOLDER, REPO, ui_to_api

pytestmark = [pytest.mark.comfyui, pytest.mark.browser, pytest.mark.slow]

BROWSER_DIR = Path(__file__).resolve().parent / "browser"
DRIVER = BROWSER_DIR / "drive.mjs"
WORKFLOWS = sorted((REPO / "example_workflows").glob("*.json"))
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
# Frontend-only nodes: never sent to the server.
VIRTUAL_TYPES = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}


@pytest.fixture(scope="session")
def driver_ready():
    if shutil.which("node") is None:
        pytest.skip("browser test skipped: Node.js (`node`) is not on PATH")
    if not Path(CHROMIUM).exists():
        pytest.skip(f"browser test skipped: Chromium not found at {CHROMIUM} "
                    "(apt-get install chromium, or set CHROMIUM)")
    if not (BROWSER_DIR / "node_modules" / "playwright-core").is_dir():
        pytest.skip("browser test skipped: playwright-core is not installed "
                    "(cd tests/integration/browser && npm install)")
    return True


def drive(*args: str, timeout: float = 300, env: dict | None = None) -> dict:
    proc = subprocess.run(["node", str(DRIVER), *args], cwd=BROWSER_DIR, capture_output=True,
                          text=True, timeout=timeout,
                          env={**os.environ, "CHROMIUM": CHROMIUM, **(env or {})})
    if proc.returncode != 0:
        pytest.fail(f"drive.mjs {args[0]} failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def checked(comfy_server, driver_ready, tmp_path_factory):
    assert WORKFLOWS, "example_workflows/ has no workflow"
    shots = tmp_path_factory.mktemp("screenshots")
    return drive("check", comfy_server.url + "/", str(shots), *map(str, WORKFLOWS))


def own_page_errors(result: dict) -> list[str]:
    # The frontend logs 404s for optional user files and refused internet look-ups (offline);
    # anything else thrown while our workflows load is a failure.
    return [e for e in result["consoleErrors"]
            if not e.startswith("Failed to load resource") and ("LoraRar" in e or "lorarar" in e.lower())]


@pytest.mark.parametrize("workflow", WORKFLOWS, ids=lambda p: p.stem)
def test_workflow_loads_with_no_missing_nodes(checked, workflow):
    report = checked["reports"][workflow.stem]
    assert report["missingTypes"] == [], f"node types the frontend does not know: {report['missingTypes']}"
    assert report["unregisteredLoaded"] == []
    assert report["dialogs"] == [], f"a dialog opened on load: {report['dialogs']}"
    assert report["loadedNodes"] == report["expectedNodes"]
    assert report["nodesWithErrors"] == []


@pytest.mark.parametrize("workflow", WORKFLOWS, ids=lambda p: p.stem)
def test_workflow_links_valid_and_prompt_builds(checked, workflow):
    report = checked["reports"][workflow.stem]
    data = json.loads(workflow.read_text())
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
def test_frontend_prompt_equals_python_conversion(comfy_server, checked, workflow):
    """test_server runs the examples through ui_to_api(); it must agree with the frontend."""
    frontend = {k: {"class_type": v["class_type"], "inputs": v["inputs"]}
                for k, v in checked["reports"][workflow.stem]["prompt"].items()}
    converted = ui_to_api(json.loads(workflow.read_text()), comfy_server.get_json("/object_info", timeout=60))
    assert frontend == converted


@pytest.mark.parametrize("workflow", WORKFLOWS, ids=lambda p: p.stem)
def test_server_accepts_frontend_prompt_except_model_files(comfy_server, checked, workflow):
    """POST the frontend's API prompt: the real server validates every input (types, ranges,
    combo values). Only the model files a shared workflow names but cannot ship may fail."""
    prompt = checked["reports"][workflow.stem]["prompt"]
    status, answer = comfy_server.post_json("/prompt", {"prompt": prompt, "client_id": "browser-test"})
    if status == 200:  # every file present: nothing to check, but don't leave it queued
        comfy_server.post_json("/queue", {"delete": [answer["prompt_id"]]})
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


def test_missing_node_is_reported(comfy_server, driver_ready, tmp_path):
    """Control: the checks above can fail — a workflow with an unknown node type is caught."""
    data = json.loads(WORKFLOWS[0].read_text())
    data["nodes"][1]["type"] = "LoraRarNoSuchNode"
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps(data))
    report = drive("check", comfy_server.url + "/", "-", str(broken))["reports"]["broken"]
    assert report["missingTypes"] == ["LoraRarNoSuchNode"]
    assert any("LoraRarNoSuchNode" in d for d in report["dialogs"]), report["dialogs"]


def test_missing_checkpoint_offered_for_download(comfy_server, driver_ready):
    """The checkpoint loader carries `properties.models`, so a user without SDXL base gets
    the frontend's missing-models dialog with a download, as for core templates."""
    workflow = REPO / "example_workflows" / "lorarar_sdxl_subject_style.json"
    report = drive("check", comfy_server.url + "/", "-", str(workflow),
                   env={"SHOW_MISSING_MODELS": "1"})["reports"][workflow.stem]
    assert report["missingTypes"] == []
    assert any("sd_xl_base_1.0.safetensors" in d for d in report["dialogs"]), report["dialogs"]


def test_templates_open_from_the_template_browser(comfy_server, driver_ready):
    """Browse Templates → Custom Nodes → ComfyUI-LoRA-rar → each card loads its workflow; the
    only dialog allowed is the missing-models offer for the SDXL checkpoint."""
    result = drive("template", comfy_server.url + "/", PACK_FOLDER, *[p.stem for p in WORKFLOWS])
    for workflow in WORKFLOWS:
        assert result["cards"][workflow.stem], f"no template card for {workflow.stem}"
        loaded = result["loaded"][workflow.stem]
        assert loaded["types"] == sorted(n["type"] for n in json.loads(workflow.read_text())["nodes"])
        for dialog in loaded["dialogs"]:
            assert dialog.startswith("Missing Models") and "sd_xl_base_1.0.safetensors" in dialog, dialog


def test_no_page_errors_from_our_nodes(checked):
    assert checked["frontendVersion"], "the page is not the ComfyUI frontend"
    assert own_page_errors(checked) == []


@pytest.mark.parametrize("workflow", WORKFLOWS, ids=lambda p: p.stem)
def test_screenshot_shows_the_graph(checked, workflow):
    shot = Path(checked["reports"][workflow.stem]["screenshot"])
    with Image.open(shot) as image:
        assert image.width >= 800 and image.height >= 500
        # A drawn graph has contrast; an empty canvas or a blank page does not.
        assert max(ImageStat.Stat(image.convert("L")).stddev) > 10
        if os.environ.get("LORARAR_UPDATE_THUMBNAILS") == "1":
            save_jpeg(image, workflow.with_suffix(".jpg"), width=1200, quality=85)
            if workflow.stem == "lorarar_sdxl_subject_style":
                save_jpeg(image, REPO / "docs" / "workflow.jpg", width=960, quality=78)


def save_jpeg(image: Image.Image, path: Path, width: int, quality: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rgb = image.convert("RGB")
    if rgb.width > width:
        rgb = rgb.resize((width, round(rgb.height * width / rgb.width)), Image.LANCZOS)
    tmp = path.with_suffix(".tmp.jpg")
    rgb.save(tmp, "JPEG", quality=quality, optimize=True)
    os.replace(tmp, path)
