"""Real ComfyUI servers for the integration and browser tests (session fixtures).

`comfy_server`: the ComfyUI checkout found through `COMFYUI_PATH`, started headless on
127.0.0.1 (a free port) with a throw-away base directory whose `custom_nodes/` holds this pack
(symlinked, under its published folder name) and the test-only pack in
`custom_nodes_testonly/`. It serves the frontend ComfyUI pins (its comfyui-frontend-package),
or `COMFYUI_FRONTEND_ROOT` when set. Everything is skipped, with the reason, when
`COMFYUI_PATH` is unset.

`frontend_server(frontend)`: the server for one entry of `FRONTENDS` — the pinned frontend
(that is `comfy_server`) and the newest one, a folder named by `LORARAR_NEWEST_FRONTEND`
(`pip install --target DIR comfyui-frontend-package==1.58.1`; DIR, its
`comfyui_frontend_package` or its `static` folder), served by a second server with
`--front-end-root`, started on first use. Browser tests are parametrised over `FRONTENDS`;
the newest one is skipped, with the reason, when the variable is unset.
"""

from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.integration.comfy_support import (
    ComfyServer,
    comfyui_path,
    git_commit,
    running_comfy,
)

NEWEST_FRONTEND_ENV = "LORARAR_NEWEST_FRONTEND"


@dataclass(frozen=True)
class Frontend:
    role: str                 # "pinned": what ComfyUI's requirements pin; "newest": from PyPI
    version: str              # e.g. "1.27.10"; "" when it cannot be told before the page runs
    root: Path | None         # --front-end-root; None: the server's own
    unavailable: str = ""     # why the tests for it are skipped

    @property
    def id(self) -> str:
        return f"{self.role}-{self.version or ('not-installed' if self.unavailable else 'unknown')}"


def frontend_static_dir(folder: Path) -> Path | None:
    """The frontend's static folder (the one with index.html) in a pip --target folder, the
    comfyui_frontend_package folder, or the static folder itself."""
    for candidate in (folder, folder / "static", folder / "comfyui_frontend_package" / "static"):
        if (candidate / "index.html").is_file():
            return candidate
    return None


def frontend_version(static: Path) -> str:
    """Version from the wheel's dist-info next to the package (pip install --target)."""
    for parent in (static, *static.parents[:3]):
        for info in parent.glob("comfyui_frontend_package-*.dist-info"):
            return info.name[len("comfyui_frontend_package-"):-len(".dist-info")]
    return ""


def pinned_frontend_version(comfy: Path | None) -> str:
    requirements = comfy / "requirements.txt" if comfy else None
    if requirements and requirements.is_file():
        match = re.search(r"^comfyui-frontend-package==([\w.]+)", requirements.read_text(), re.MULTILINE)
        if match:
            return match.group(1)
    return ""


def discover_frontends() -> list[Frontend]:
    override = os.environ.get("COMFYUI_FRONTEND_ROOT", "").strip()
    if override:
        static = frontend_static_dir(Path(override)) or Path(override)
        pinned = Frontend("pinned", frontend_version(static), static)
    else:
        pinned = Frontend("pinned", pinned_frontend_version(comfyui_path()), None)
    folder = os.environ.get(NEWEST_FRONTEND_ENV, "").strip()
    if not folder:
        newest = Frontend("newest", "", None, unavailable=(
            f"newest frontend not installed: set {NEWEST_FRONTEND_ENV} to a folder made with "
            "`pip install --no-deps --target DIR comfyui-frontend-package==1.58.1` "
            "(see docs/contributing-tests.md)"))
    else:
        static = frontend_static_dir(Path(folder).expanduser())
        if static is None:
            newest = Frontend("newest", "", None, unavailable=(
                f"{NEWEST_FRONTEND_ENV}={folder} holds no comfyui_frontend_package/static/index.html"))
        else:
            newest = Frontend("newest", frontend_version(static), static.resolve())
    return [pinned, newest]


FRONTENDS = discover_frontends()


@pytest.fixture(scope="session")
def comfy_server(tmp_path_factory) -> ComfyServer:
    root = tmp_path_factory.mktemp("comfyui")
    override = os.environ.get("COMFYUI_FRONTEND_ROOT", "").strip()
    with running_comfy(root, Path(override) if override else None) as server:
        yield server


@pytest.fixture(scope="module")
def per_cast_server(tmp_path_factory) -> ComfyServer:
    """A server whose K-LoRA models switch by weight functions applied at every cast — the way
    they switch under dynamic VRAM, which needs a GPU — forced on the CPU's classic patcher."""
    root = tmp_path_factory.mktemp("comfyui-per-cast")
    with running_comfy(root, label="per-cast", env={"LORARAR_K_LORA_SWITCH": "per-cast"}) as server:
        yield server


@pytest.fixture(scope="session")
def frontend_server(comfy_server, tmp_path_factory):
    """frontend_server(frontend) → the ComfyServer serving that frontend (skips when it is
    not installed). Extra servers start on first use and stop at the end of the session."""
    extra: dict[str, ComfyServer] = {}
    failed: dict[str, str] = {}
    with contextlib.ExitStack() as stack:
        def get(frontend: Frontend) -> ComfyServer:
            if frontend.unavailable:
                pytest.skip(frontend.unavailable)
            if frontend.role == "pinned":
                return comfy_server
            if frontend.id in failed:  # one start attempt per session, not one per test
                pytest.fail(failed[frontend.id], pytrace=False)
            if frontend.id not in extra:
                root = tmp_path_factory.mktemp(f"comfyui-{frontend.id}")
                try:
                    extra[frontend.id] = stack.enter_context(running_comfy(root, frontend.root, frontend.id))
                except pytest.fail.Exception as err:
                    failed[frontend.id] = f"server for frontend {frontend.id}: {err}"
                    raise
            return extra[frontend.id]

        yield get


def pytest_report_header(config):
    path = comfyui_path()
    if path is None:
        return "ComfyUI: COMFYUI_PATH not set, real-ComfyUI integration tests will be skipped"
    frontends = ", ".join(f.id + (f" ({f.root})" if f.root else "") for f in FRONTENDS)
    return [f"ComfyUI: {path} (commit {git_commit(path)})", f"frontends: {frontends}"]
