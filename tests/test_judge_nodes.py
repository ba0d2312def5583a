"""The judge nodes (nodes/nodes_judge.py), in-process with ComfyUI's real comfy_api.

Skipped unless `comfy_api` is importable, directly or from the checkout named by COMFYUI_PATH
(its Python dependencies — torch, av, tqdm … — must be importable too). The library under the
nodes (judge_image_batch, verdict_grid) is also tested without ComfyUI at the bottom.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import os
import sys
from pathlib import Path

import numpy as np
import pytest

from hypernet.errors import JudgeInputError
from hypernet.judge import BackendConfig, judge_image_batch, make_backend, verdict_grid
from tests.support.judge.layout import STYLE_COLOURS, SUBJECT_COLOURS, WRONG, split_image
from tests.support.judge.server import JudgeServer, colour_judge

REPO = Path(__file__).resolve().parents[1]
KEY = "sk-node-" + "x9" * 12


def _batch(images) -> np.ndarray:
    return np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0 for im in images])


def _inputs():
    from PIL import Image

    dog, ink = SUBJECT_COLOURS["dog"], STYLE_COLOURS["watercolor"]
    generated = _batch([split_image(dog, ink, serial=1), split_image(WRONG, ink, serial=2),
                        split_image(dog, WRONG, serial=3)])
    subject = _batch([Image.new("RGB", (64, 64), tuple(c + k for c in dog)) for k in range(2)])
    style = _batch([Image.new("RGB", (64, 64), ink)])
    return generated, subject, style


def _pack_error(module, name: str):
    """The pack's own exception class (the pack is imported as a separate package here, as in
    ComfyUI, so its classes are not the test's `hypernet.errors` ones)."""
    return getattr(sys.modules[module.__name__.rsplit(".nodes.", 1)[0] + ".hypernet.errors"], name)


def _node_module():
    comfy = os.environ.get("COMFYUI_PATH", "").strip()
    if comfy and comfy not in sys.path:
        sys.path.append(comfy)
    try:
        importlib.import_module("comfy_api.latest")
    except Exception as exc:  # any import failure means "no usable ComfyUI here"
        pytest.skip(f"comfy_api not importable ({exc.__class__.__name__}: {exc}); set COMFYUI_PATH")
    name = "lorarar_pack_under_test"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            name, REPO / "__init__.py", submodule_search_locations=[str(REPO)])
        package = importlib.util.module_from_spec(spec)
        sys.modules[name] = package
        spec.loader.exec_module(package)
    return importlib.import_module(f"{name}.nodes.nodes_judge")


@pytest.mark.comfyui
def test_node_schemas_ids_and_tooltips():
    module = _node_module()
    assert [n.define_schema().node_id for n in module.NODES] == ["LoraRarMllmBackend", "LoraRarMllmJudge"]
    for node in module.NODES:
        schema = node.GET_SCHEMA()  # what ComfyUI calls: finalizes and validates the schema
        assert schema.category == "LoRA.rar" and schema.display_name.startswith("LoRA.rar")
        for item in schema.inputs:
            assert item.tooltip, f"{schema.node_id}.{item.id} has no tooltip"
    judge_schema = module.LoraRarMllmJudge.define_schema()
    assert [o.io_type for o in judge_schema.outputs] == ["FLOAT", "FLOAT", "FLOAT", "STRING", "IMAGE"]
    assert [o.id for o in judge_schema.outputs] == ["content", "style", "joint", "report", "grid"]
    assert judge_schema.inputs[0].io_type == "LORARAR_MLLM_BACKEND"
    backend_ids = [i.id for i in module.LoraRarMllmBackend.define_schema().inputs]
    assert "api_key_env" in backend_ids and not any(i in ("api_key", "key") for i in backend_ids)


@pytest.mark.comfyui
def test_nodes_execute_against_a_loopback_server(monkeypatch):
    import torch

    module = _node_module()
    monkeypatch.setenv("JUDGE_NODE_KEY", KEY)
    generated, subject, style = _inputs()
    with JudgeServer(colour_judge) as server:
        (config,) = module.LoraRarMllmBackend.execute(
            protocol="openai", url=server.url, model="m", api_key_env="JUDGE_NODE_KEY",
            api_key_file="", concurrency=2, timeout=5.0, max_retries=1, max_tokens=16).args
        assert KEY not in repr(config)
        output = module.LoraRarMllmJudge.execute(
            backend=config, generated=torch.from_numpy(generated), subject_references=torch.from_numpy(subject),
            style_reference=torch.from_numpy(style), subject_name="dog", style_name="watercolor",
            mode="yesno", threshold=50.0, use_cache=False)
    content, style_score, joint, report, grid = output.args
    assert len(server.requests) == 3 * (2 + 1)
    assert server.requests[0].headers["Authorization"] == f"Bearer {KEY}"
    assert math.isclose(content, 2 / 3) and math.isclose(style_score, 2 / 3) and math.isclose(joint, 1 / 3)
    assert "generated[1]: NO" in report and KEY not in report
    assert grid.dtype == torch.float32 and grid.ndim == 4 and grid.shape[0] == 1 and grid.shape[-1] == 3
    assert 0.0 <= float(grid.min()) and float(grid.max()) <= 1.0


@pytest.mark.comfyui
def test_backend_node_rejects_a_pasted_key():
    module = _node_module()
    with pytest.raises(_pack_error(module, "JudgeInputError"), match="NAME of an environment variable"):
        module.LoraRarMllmBackend.execute(
            protocol="openai", url="http://127.0.0.1:1", model="m", api_key_env="sk-live abc",
            api_key_file="", concurrency=1, timeout=5.0, max_retries=0, max_tokens=8)


# --- the library the judge node calls, without ComfyUI ------------------------------------

def test_judge_image_batch_and_grid_colours():
    generated, subject, style = _inputs()
    with JudgeServer(colour_judge) as server:
        backend = make_backend(BackendConfig("ollama", server.url, "m", timeout=5.0))
        result, jobs = judge_image_batch(backend, generated, subject, style, "dog", "watercolor")
    assert [r["joint"] for r in result.records] == ["yes", "no", "no"]
    (row,) = result.by_method
    assert (row["content_yes"], row["style_yes"], row["joint_yes"]) == (2, 2, 1)
    grid = verdict_grid([job.generated for job in jobs], result.records, cell=64)
    assert grid.size == (2 * (64 + 12), 2 * (64 + 12 + 52))  # 3 images → 2×2 cells
    assert grid.getpixel((2, 2)) == (46, 160, 67)  # first frame green (correct)
    assert grid.getpixel((64 + 12 + 2, 2)) == (207, 34, 46)  # second frame red


@pytest.mark.parametrize("which, value, match", [
    ("generated", np.zeros((0, 8, 8, 3), np.float32), "generated: the image batch is empty"),
    ("subject", np.zeros((2, 8, 8), np.float32), r"subject_references: expected an IMAGE of shape .*found shape \[2, 8, 8\]"),
    ("style", np.zeros((2, 8, 8, 3), np.float32), "style_reference: expected exactly 1 image.*batch of 2"),
    ("style", None, "style_reference: expected an IMAGE batch, got nothing"),
])
def test_judge_image_batch_bad_inputs_name_the_input(which, value, match):
    generated, subject, style = _inputs()
    inputs = {"generated": generated, "subject": subject, "style": style}
    inputs[which] = value
    backend = make_backend(BackendConfig("ollama", "http://127.0.0.1:9", "m"))
    with pytest.raises(JudgeInputError, match=match):
        judge_image_batch(backend, inputs["generated"], inputs["subject"], inputs["style"])
