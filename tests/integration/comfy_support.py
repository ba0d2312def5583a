"""Helpers for the real-ComfyUI integration and browser tests (used by conftest.py).

The server is the newest ComfyUI checkout found through `COMFYUI_PATH`, started headless on
127.0.0.1 (a free port) with a throw-away base directory whose `custom_nodes/` holds this pack
(symlinked, under its published folder name) and the test-only pack in
`custom_nodes_testonly/`. Everything is skipped, with the reason, when `COMFYUI_PATH` is unset.

The server runs under `COMFYUI_PYTHON` (default: the interpreter running pytest). ComfyUI needs
torchvision, which has no build matching the machine's CPU torch, so it usually lives in a
separate venv: see CONTRIBUTING.md, "Real-ComfyUI integration tests".
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:  # annotations only: the helpers below import what they use
    import torch

REPO = Path(__file__).resolve().parents[2]
TESTONLY_PACK = Path(__file__).resolve().parent / "custom_nodes_testonly" / "lorarar_testonly"
# The folder name a user gets from the registry / ComfyUI-Manager.
PACK_FOLDER = "ComfyUI-LoRA-rar"
STARTUP_TIMEOUT_S = float(os.environ.get("LORARAR_COMFY_STARTUP_TIMEOUT", "240"))


def comfyui_path() -> Path | None:
    value = os.environ.get("COMFYUI_PATH", "").strip()
    return Path(value).expanduser().resolve() if value else None


def require_comfyui() -> Path:
    """The ComfyUI checkout, or skip the calling test with the reason."""
    path = comfyui_path()
    if path is None:
        pytest.skip("real-ComfyUI integration test skipped: COMFYUI_PATH is not set "
                    "(set it to a ComfyUI checkout and run with that ComfyUI's venv python; "
                    "see README 'Integration tests')")
    if not (path / "main.py").is_file():
        pytest.skip(f"real-ComfyUI integration test skipped: COMFYUI_PATH={path} has no main.py")
    return path


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class ComfyServer:
    url: str
    base_dir: Path
    log_path: Path
    process: subprocess.Popen
    comfyui: Path
    commit: str = ""
    client_id: str = "lorarar-tests"
    _history_seen: set = field(default_factory=set)
    _object_info: dict | None = None

    # -- HTTP helpers (stdlib only: the tests must not need extra packages) ---------------
    def get_json(self, route: str, timeout: float = 30):
        with urllib.request.urlopen(self.url + route, timeout=timeout) as resp:
            return json.loads(resp.read())

    def post_json(self, route: str, payload: dict, timeout: float = 30):
        req = urllib.request.Request(self.url + route, data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as err:  # ComfyUI answers 400 with a JSON body
            return err.code, json.loads(err.read() or b"{}")

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def with_new_widget_defaults(self, prompt: dict) -> dict:
        """The prompt with every required widget a node has gained in this ComfyUI (e.g. core's
        LoraModelLoader `bypass`, 2026) at its default, as the frontend fills a new widget when it
        loads an older workflow. Inputs the prompt gives are kept."""
        if self._object_info is None:
            self._object_info = self.get_json("/object_info", timeout=120)
        out = {}
        for node_id, node in prompt.items():
            info = self._object_info.get(node["class_type"], {})
            inputs = dict(node["inputs"])
            for name, spec in info.get("input", {}).get("required", {}).items():
                if name not in inputs and len(spec) > 1 and isinstance(spec[1], dict) and "default" in spec[1]:
                    inputs[name] = spec[1]["default"]
            out[node_id] = {**node, "inputs": inputs}
        return out

    def run_prompt_expecting_error(self, prompt: dict, timeout: float = 300) -> dict:
        """Run a prompt that must fail while executing; returns the execution_error message
        (node_id, node_type, exception_type, exception_message)."""
        entry = self.run_prompt(prompt, timeout=timeout, expect_error=True)
        errors = [m[1] for m in entry["status"].get("messages", []) if m[0] == "execution_error"]
        assert errors, f"no execution_error in {entry['status']}"
        return errors[0]

    def run_prompt(self, prompt: dict, timeout: float = 300, expect_error: bool = False) -> dict:
        """POST /prompt, then poll /history until it finishes; returns the history entry.
        Fails with the server's validation answer or the execution error and the log tail."""
        prompt = self.with_new_widget_defaults(prompt)
        status, answer = self.post_json("/prompt", {"prompt": prompt, "client_id": self.client_id})
        if status != 200 or "prompt_id" not in answer:
            pytest.fail(f"ComfyUI refused the prompt (HTTP {status}): {json.dumps(answer)[:3000]}")
        prompt_id = answer["prompt_id"]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            history = self.get_json(f"/history/{prompt_id}")
            entry = history.get(prompt_id)
            if entry and entry.get("status", {}).get("completed") is not None \
                    and entry["status"].get("status_str") in ("success", "error"):
                failed = entry["status"]["status_str"] != "success"
                if failed and expect_error:
                    return entry
                if expect_error:
                    pytest.fail(f"prompt {prompt_id} succeeded but was expected to fail")
                if failed:
                    messages = entry["status"].get("messages", [])
                    pytest.fail(f"prompt {prompt_id} failed in ComfyUI: {json.dumps(messages)[:4000]}"
                                f"\n--- server log tail ---\n{self.log_text()[-4000:]}")
                return entry
            if self.process.poll() is not None:
                pytest.fail(f"ComfyUI exited (rc {self.process.returncode}) while running a prompt:"
                            f"\n{self.log_text()[-4000:]}")
            time.sleep(0.2)
        pytest.fail(f"prompt {prompt_id} did not finish in {timeout:.0f} s\n{self.log_text()[-4000:]}")


def git_commit(path: Path) -> str:
    version = path / "comfyui_version.py"
    try:
        out = subprocess.run(["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=10)
        if out.returncode == 0:
            return out.stdout.strip()
    except OSError:
        pass
    stamp = path / "COMFYUI_COMMIT"  # written by the environment setup for archive exports
    if stamp.is_file():
        return stamp.read_text().strip()
    return version.read_text().strip().splitlines()[-1] if version.is_file() else "unknown"


def make_base_dir(root: Path) -> Path:
    base = root / "comfy_base"
    for sub in ("custom_nodes", "models/loras", "models/lorarar", "models/checkpoints",
                "input", "output", "temp", "user"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    # A symlink keeps the test on the working tree as it is; a user's install is the same
    # folder cloned there. The test-only pack is copied so no __pycache__ lands in the repo.
    # LORARAR_PACK_SOURCE tests another checkout of the pack (e.g. a release candidate).
    source = Path(os.environ.get("LORARAR_PACK_SOURCE") or REPO).resolve()
    (base / "custom_nodes" / PACK_FOLDER).symlink_to(source, target_is_directory=True)
    shutil.copytree(TESTONLY_PACK, base / "custom_nodes" / TESTONLY_PACK.name,
                    ignore=shutil.ignore_patterns("__pycache__"))
    return base


def wait_ready(url: str, process: subprocess.Popen, log_path: Path) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"ComfyUI exited during start-up (rc {process.returncode}):\n"
                               f"{log_path.read_text(errors='replace')[-6000:]}")
        try:
            with urllib.request.urlopen(url + "/system_stats", timeout=5) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            pass
        time.sleep(0.5)
    raise RuntimeError(f"ComfyUI did not answer on {url} within {STARTUP_TIMEOUT_S:.0f} s:\n"
                       f"{log_path.read_text(errors='replace')[-6000:]}")


def import_failures(log: str) -> list[str]:
    """Log lines where ComfyUI reports that *our* packs (or their nodes) failed to import."""
    ours = (PACK_FOLDER, TESTONLY_PACK.name)
    return [line for line in log.splitlines()
            if ("IMPORT FAILED" in line or "Cannot import" in line) and any(n in line for n in ours)]




# ---------------------------------------------------------------------------------------------
# Node schemas the example workflows use, snapshotted from a real server so the unit test
# (tests/test_example_workflows.py) can check widget values without ComfyUI.

SCHEMA_SNAPSHOT = REPO / "tests" / "data" / "example_workflow_schemas.json"
# Combos whose options are the user's files: any file name is valid in a shared workflow.
FILE_COMBOS = {"ckpt_name", "lora_name", "hypernet_name"}


def schema_snapshot(object_info: dict, node_types) -> dict:
    """{type: {"inputs": [[section, name, type, options-without-tooltip]], "outputs": [...]}}"""
    out = {}
    for node_type in sorted(node_types):
        info = object_info[node_type]
        inputs = []
        for section in ("required", "optional"):
            for name, spec in info["input"].get(section, {}).items():
                kind = spec[0]
                options = dict(spec[1]) if len(spec) > 1 and isinstance(spec[1], dict) else {}
                options.pop("tooltip", None)
                if isinstance(kind, list):  # old-style combo: the option list is the type
                    options["options"], kind = kind, "COMBO"
                if name in FILE_COMBOS:
                    options.pop("options", None)
                    options.pop("default", None)
                inputs.append([section, name, kind, options])
        out[node_type] = {"inputs": inputs, "outputs": info["output"]}
    return out


def pack_node_ids_in_source() -> set[str]:
    """Every node ID declared in the pack's nodes/ (what /object_info must list)."""
    ids = set()
    for path in (REPO / "nodes").glob("nodes_*.py"):
        ids.update(re.findall(r"node_id\s*=\s*[\"'](LoraRar\w+)[\"']", path.read_text()))
    return ids


WIDGET_KINDS = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}


def ui_to_api(workflow: dict, object_info: dict) -> dict:
    """A UI-format workflow as the API prompt the frontend's graphToPrompt() makes of it
    (without `_meta`): widget values by the node schema's widget order, links as [id, slot].
    Frontend-only nodes (Note) and muted/bypassed nodes are left out."""
    links = {link[0]: link for link in workflow["links"]}
    prompt = {}
    for node in workflow["nodes"]:
        if node["type"] not in object_info or node.get("mode", 0) != 0:
            continue
        info = object_info[node["type"]]
        values = iter(node.get("widgets_values", []))
        missing = object()
        inputs = {}
        for section in ("required", "optional"):
            for name, spec in info["input"].get(section, {}).items():
                options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
                if (isinstance(spec[0], list) or spec[0] in WIDGET_KINDS) and not options.get("forceInput"):
                    value = next(values, missing)
                    # A workflow saved before a widget was appended to its node has no value for
                    # it: the frontend keeps the widget's default.
                    inputs[name] = options.get("default") if value is missing else value
                    if options.get("control_after_generate"):
                        next(values, None)  # the frontend-only "control after generate" value
        for slot in node.get("inputs", []):
            if slot.get("link") is not None:
                link = links[slot["link"]]
                inputs[slot["name"]] = [str(link[1]), link[2]]
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return prompt


# ---------------------------------------------------------------------------------------------
# Files written by the test-only nodes (tests/integration/custom_nodes_testonly)

def dump(server, name: str) -> dict[str, torch.Tensor]:
    """A file written by the test-only LoraRarTestDumpWeights node."""
    from safetensors.torch import load_file

    return load_file(server.base_dir / "output" / "lorarar_testonly" / f"{name}.safetensors")


def read_record(server, name) -> list[tuple[float, dict[str, torch.Tensor]]]:
    """[(p, {layer name: weight})] per model call, p = 1 − timestep/999 (ComfyUI's percent)."""
    from safetensors import safe_open

    path = server.base_dir / "output" / "lorarar_testonly" / f"{name}.safetensors"
    with safe_open(str(path), "pt") as f:
        calls = json.loads(f.metadata()["calls"])
        out = [(1.0 - c["timestep"] / 999.0, {}) for c in calls]
        for key in f.keys():
            number, weight_key = key.split("/", 1)
            out[int(number)][1][weight_key[len("diffusion_model."):-len(".weight")]] = f.get_tensor(key)
    return out


def model_key(layer: str) -> str:
    """Canonical layer name → key in the dump file written by LoraRarTestDumpWeights."""
    if layer.startswith("te1."):
        return "clip.clip_l.transformer." + layer[4:] + ".weight"
    if layer.startswith("te2."):
        return "clip.clip_g.transformer." + layer[4:] + ".weight"
    return "unet." + layer + ".weight"


def lora_shapes(base: dict[str, torch.Tensor]) -> dict[str, tuple[int, int]]:
    """What a kohya SDXL LoRA trains, at the tiny model's shapes: every Linear in the
    transformer blocks plus the text encoders' attention/MLP layers."""
    shapes = {}
    for key, value in base.items():
        if value.dim() != 2 or not key.endswith(".weight"):
            continue
        if key.startswith("unet.") and (".transformer_blocks." in key or key.endswith((".proj_in.weight", ".proj_out.weight"))):
            if "norm" not in key:
                shapes[key[5:-7]] = tuple(value.shape)
        for prefix, te in (("clip.clip_l.transformer.", "te1."), ("clip.clip_g.transformer.", "te2.")):
            if key.startswith(prefix) and re.search(r"\.layers\.\d+\.(self_attn\.\w+_proj|mlp\.fc\d)\.weight$", key):
                shapes[te + key[len(prefix):-7]] = tuple(value.shape)
    return shapes


# ---------------------------------------------------------------------------------------------
# Starting and stopping servers (conftest.py's fixtures, benchmarks/gpu_check.py)

@contextlib.contextmanager
def running_comfy(root: Path, front_end_root: Path | None = None, label: str = "", env: dict | None = None,
                  device_args: tuple[str, ...] = ("--cpu",)):
    """Start a ComfyUI server with its own base directory under `root` (and `env` added to its
    environment); stop it on exit. Fails (not errors) with the log when it cannot start or our
    pack did not load. `device_args`: `--cpu` for the tests; a GPU run passes none (dynamic VRAM
    where ComfyUI enables it) or `--disable-dynamic-vram` (benchmarks/gpu_check.py)."""
    comfy = require_comfyui()
    python = os.environ.get("COMFYUI_PYTHON", sys.executable)
    base = make_base_dir(root)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = root / "server.log"
    cmd = [python, "main.py", *device_args, "--listen", "127.0.0.1", "--port", str(port),
           "--base-directory", str(base), "--database-url", "sqlite:///:memory:",
           "--disable-auto-launch"]
    if front_end_root is not None:
        cmd += ["--front-end-root", str(front_end_root)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1",
           # Offline: no hub look-ups from anything ComfyUI imports.
           "HF_HUB_OFFLINE": "1", "DO_NOT_TRACK": "1", **(env or {})}
    log_file = open(log_path, "wb")
    process = subprocess.Popen(cmd, cwd=comfy, stdout=log_file, stderr=subprocess.STDOUT, env=env)
    server = ComfyServer(url, base, log_path, process, comfy, commit=git_commit(comfy))
    problem = None
    try:
        wait_ready(url, process, log_path)
        problem = pack_problem(server)
    except RuntimeError as err:
        problem = str(err)
        if "ModuleNotFoundError" in problem:
            problem += (f"\nHint: {python} lacks ComfyUI's requirements; run pytest with the "
                        "ComfyUI venv's python or set COMFYUI_PYTHON to it.")
    try:
        if problem is None:
            yield server
    finally:
        stop(process)
        log_file.close()
        # Keep the log where a CI artifact step can find it.
        keep = os.environ.get("LORARAR_COMFY_LOG")
        if keep:
            shutil.copyfile(log_path, f"{keep}.{label}" if label else keep)
    if problem is not None:
        pytest.fail(problem, pytrace=False)


def pack_problem(server: ComfyServer) -> str | None:
    """Why the pack is not fully there, or None. ComfyUI keeps running when a custom node fails
    to import, and the pack itself logs (and skips) a topic module that fails to import, so
    both the log and /object_info are checked."""
    failures = import_failures(server.log_text())
    if failures:
        return ("ComfyUI could not import the pack:\n" + "\n".join(failures)
                + "\n--- log tail ---\n" + server.log_text()[-6000:])
    missing = pack_node_ids_in_source() - set(server.get_json("/object_info", timeout=120))
    if missing:
        return (f"ComfyUI started but lacks these nodes of the pack: {sorted(missing)}"
                "\n--- log tail ---\n" + server.log_text()[-6000:])
    return None


def stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)
