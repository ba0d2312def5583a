"""A real ComfyUI server for the integration and browser tests (session fixture).

The server is the newest ComfyUI checkout found through `COMFYUI_PATH`, started headless on
127.0.0.1 (a free port) with a throw-away base directory whose `custom_nodes/` holds this pack
(symlinked, under its published folder name) and the test-only pack in
`custom_nodes_testonly/`. Everything is skipped, with the reason, when `COMFYUI_PATH` is unset.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from tests.integration.comfy_support import (
    ComfyServer,
    comfyui_path,
    free_port,
    git_commit,
    import_failures,
    make_base_dir,
    require_comfyui,
    wait_ready,
)


@pytest.fixture(scope="session")
def comfy_server(tmp_path_factory) -> ComfyServer:
    comfy = require_comfyui()
    python = os.environ.get("COMFYUI_PYTHON", sys.executable)
    root = tmp_path_factory.mktemp("comfyui")
    base = make_base_dir(root)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = root / "server.log"
    cmd = [python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port),
           "--base-directory", str(base), "--database-url", "sqlite:///:memory:",
           "--disable-auto-launch"]
    if os.environ.get("COMFYUI_FRONTEND_ROOT"):
        cmd += ["--front-end-root", os.environ["COMFYUI_FRONTEND_ROOT"]]
    env = {**os.environ, "PYTHONUNBUFFERED": "1",
           # Offline: no hub look-ups from anything ComfyUI imports.
           "HF_HUB_OFFLINE": "1", "DO_NOT_TRACK": "1"}
    log_file = open(log_path, "wb")
    process = subprocess.Popen(cmd, cwd=comfy, stdout=log_file, stderr=subprocess.STDOUT, env=env)
    server = ComfyServer(url, base, log_path, process, comfy, commit=git_commit(comfy))
    problem = None
    try:
        wait_ready(url, process, log_path)
        failures = import_failures(server.log_text())
        if failures:
            problem = ("ComfyUI could not import the pack:\n" + "\n".join(failures)
                       + "\n--- log tail ---\n" + server.log_text()[-6000:])
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
            shutil.copyfile(log_path, keep)
    if problem is not None:
        pytest.fail(problem, pytrace=False)


def stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)


def pytest_report_header(config):
    path = comfyui_path()
    if path is None:
        return "ComfyUI: COMFYUI_PATH not set, real-ComfyUI integration tests will be skipped"
    return f"ComfyUI: {path} (commit {git_commit(path)})"
