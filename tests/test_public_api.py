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


def test_the_wheel_lists_every_subpackage_and_maps_weights():
    """pyproject lists the packages explicitly (weights/ is mapped into the wheel): a new
    subpackage of hypernet/ must be listed too, or a pip install would lack it."""
    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    folders = {p.parent for p in (REPO / "hypernet").glob("*/*.py")}
    assert all((f / "__init__.py").is_file() for f in folders), "a subpackage without __init__.py"
    on_disk = {"hypernet"} | {f"hypernet.{f.name}" for f in folders}
    listed = set(setuptools["packages"])
    assert on_disk <= listed and listed - on_disk == {"hypernet.weights", "hypernet.weights.testbed"}
    assert setuptools["package-dir"] == {"hypernet.weights": "weights"}
    assert (REPO / "weights" / "catalog.json").is_file()
