"""benchmarks/gpu_check.py's CPU dry run against the real ComfyUI of COMFYUI_PATH: both of
K-LoRA's ways of switching and every method's recorded weights pass its own comparison (on a GPU
the same script also runs dynamic VRAM; see docs/performance.md)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from tests.integration.comfy_support import require_comfyui

pytestmark = [pytest.mark.comfyui, pytest.mark.slow]

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_check.py"


def test_gpu_check_dry_run_passes_on_this_comfyui(tmp_path, capsys):
    require_comfyui()
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(check)
    assert check.main(["--dry-run", "--skip-timings", "--steps", "3", "--out", str(tmp_path)]) == 0, \
        capsys.readouterr().out
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert len(report["modes"]) == 2
    for mode in report["modes"].values():
        assert set(mode["correctness"]) == {"lorarar", "np-lora", "sum", "k-lora"}
        assert mode["correctness"]["k-lora"]["style_side_judged"] > 0
