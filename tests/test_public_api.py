"""The package's public API: what `import hypernet` promises, and one version number."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import tomllib

import hypernet

REPO = Path(__file__).resolve().parents[1]


def test_version_matches_the_project_metadata():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert hypernet.__version__ == project["version"]


def test_every_public_name_resolves_and_the_docstring_example_names_exist():
    for name in hypernet.__all__:
        assert getattr(hypernet, name) is not None, name
    from hypernet.merge import merge

    assert callable(merge) and "lorarar" in hypernet.METHODS
    for name in ("read_lora", "resolve_hypernet", "save_merged"):
        assert f"{name}(" in hypernet.__doc__


def test_import_is_light():
    """`import hypernet` must not import torch (the CLI's --help stays instant)."""
    code = "import sys, hypernet; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == "False"
