"""The training nodes (nodes/nodes_train.py), in-process with a real ComfyUI.

Skipped unless `comfy_api` is importable (directly or from COMFYUI_PATH, with ComfyUI's Python
dependencies, e.g. `COMFYUI_PATH=… /path/to/comfy-venv/bin/python -m pytest tests/test_train_nodes.py`).
MODEL and CLIP are the test-only tiny SDXL-topology model of tests/integration (ComfyUI's own
SDXL classes at widths 64/128); the VAE is ComfyUI's AutoencoderKL at a small width with random
weights. Node execution runs under torch.inference_mode(), as ComfyUI runs nodes.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TINY_SDXL = REPO / "tests" / "integration" / "custom_nodes_testonly" / "lorarar_testonly" / "tiny_sdxl.py"

pytestmark = [pytest.mark.comfyui, pytest.mark.slow]


def _node_module():
    comfy = os.environ.get("COMFYUI_PATH", "").strip()
    if comfy and comfy not in sys.path:
        sys.path.append(comfy)
    try:
        import torch

        if not torch.cuda.is_available():  # ComfyUI picks its device at import: tell it first
            importlib.import_module("comfy.cli_args").args.cpu = True
        importlib.import_module("comfy_api.latest")
        importlib.import_module("comfy.sd")
    except Exception as exc:  # any import failure means "no usable ComfyUI here"
        pytest.skip(f"ComfyUI not importable ({exc.__class__.__name__}: {exc}); set COMFYUI_PATH")
    name = "lorarar_pack_under_test"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, REPO / "__init__.py", submodule_search_locations=[str(REPO)])
        package = importlib.util.module_from_spec(spec)
        sys.modules[name] = package
        spec.loader.exec_module(package)
    return importlib.import_module(f"{name}.nodes.nodes_train")


@pytest.fixture(scope="module")
def comfy_parts():
    module = _node_module()
    import comfy.sd
    import torch

    spec = importlib.util.spec_from_file_location("lorarar_tiny_sdxl", TINY_SDXL)
    tiny = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tiny)
    with torch.inference_mode():  # as ComfyUI's loaders run
        model, clip = tiny.build_model(0), tiny.build_clip(0)
        ddconfig = {"double_z": True, "z_channels": 4, "resolution": 64, "in_channels": 3, "out_ch": 3, "ch": 32,
                    "ch_mult": [1, 1, 1, 1], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0}
        vae = comfy.sd.VAE(sd={}, config={"params": {"embed_dim": 4, "ddconfig": ddconfig}})
    # ComfyUI's ops skip weight initialisation (a checkpoint always follows), so a VAE built without
    # one holds whatever memory it got — NaN more often than not. Random but finite weights instead.
    gen = torch.Generator().manual_seed(0)
    with torch.inference_mode():  # the VAE's tensors were made there, as ComfyUI's loaders make them
        for parameter in vae.first_stage_model.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=gen) * 0.05)
    return module, model, clip, vae


def _loras(model, tmp: Path | None = None):
    import torch

    from hypernet.tooling import synthetic
    from hypernet.training.injection import linear_layer_shapes

    shapes = linear_layer_shapes(model.model.diffusion_model)
    loras = []
    for seed in (1, 2):
        gen = torch.Generator().manual_seed(seed)
        factors = {n: (torch.randn(o, 4, generator=gen) * 0.2, torch.randn(4, i, generator=gen) / i ** 0.5)
                   for n, (o, i) in shapes.items()}
        loras.append(synthetic.to_state_dict(factors, "kohya", alpha=4.0))
    return loras


def test_schemas(comfy_parts):
    module = comfy_parts[0]
    assert [n.define_schema().node_id for n in module.NODES] == ["LoraRarZipLoraMerge", "LoraRarTrainHypernet"]
    for node in module.NODES:
        schema = node.GET_SCHEMA()
        assert schema.category == "LoRA.rar" and schema.display_name.endswith("(LoRA.rar)")
        assert all(item.tooltip for item in schema.inputs), schema.node_id
    outputs = module.LoraRarZipLoraMerge.define_schema().outputs
    assert [o.io_type for o in outputs] == ["MODEL", "LORA_MODEL", "IMAGE"]


def test_ziplora_node_patches_model_and_returns_merged_lora(comfy_parts):
    import torch

    module, model, clip, vae = comfy_parts
    content, style = _loras(model)
    unet = model.model.diffusion_model
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    images = torch.rand(2, 72, 64, 3, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        out = module.LoraRarZipLoraMerge.execute(
            model=model, clip=clip, vae=vae, content_lora=content, subject_images=images,
            subject_prompt="a photo of sks dog", style_lora=style, style_image=images[:1],
            style_prompt="a cat in watercolor style", steps=3, learning_rate=0.01, seed=0, resolution=64)
    new_model, merged, curve = out.args
    assert new_model is not model and len(new_model.patches) > 0
    key = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"
    assert merged[f"{key}.lora_up.weight"].shape[1] == 8  # rank 4 + 4, exact
    assert curve.shape[0] == 1 and curve.shape[-1] == 3
    assert not any(m._forward_hooks for m in unet.modules())
    for k, v in unet.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_train_node_saves_into_models_lorarar(comfy_parts, tmp_path, monkeypatch):
    import folder_paths
    import torch
    from PIL import Image
    from safetensors.torch import save_file

    module, model, clip, vae = comfy_parts
    monkeypatch.setattr(folder_paths, "models_dir", str(tmp_path / "models"))
    monkeypatch.setattr(folder_paths, "output_directory", str(tmp_path / "output"))
    loras = _loras(model) + _loras(model)[::-1]
    subjects, styles = [], []
    for i, sd in enumerate(loras):
        save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / f"l{i}.safetensors"))
        Image.new("RGB", (64, 64), (40 * i, 90, 200)).save(tmp_path / f"i{i}.png")
    for i in range(2):
        subjects.append({"name": f"s{i}", "lora": f"l{i}.safetensors", "images": f"i{i}.png", "prompt": f"sks{i} dog"})
        styles.append({"name": f"t{i}", "lora": f"l{i + 2}.safetensors", "images": f"i{i + 2}.png", "prompt": f"style{i}"})
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps({"subjects": subjects, "styles": styles,
                                    "split": {"validation_subjects": ["s1"], "validation_styles": ["t1"]}}))
    with torch.inference_mode():
        image, summary = module.LoraRarTrainHypernet.execute(
            model=model, clip=clip, vae=vae, manifest=str(manifest), output_name="tiny_test", steps=2,
            learning_rate=0.01, seed=0, resolution=64, checkpoint_every=0, validate_every=0,
            init_hypernet=module.NO_INIT, gradient_checkpointing=False, resume=False, overwrite=False).args
    saved = tmp_path / "models" / "lorarar" / "tiny_test.safetensors"
    assert saved.is_file() and str(saved) in summary and "validation objective" in summary
    from hypernet.model import load_hypernet

    hypernet = load_hypernet(saved)
    assert hypernet.widths == (64, 128) and hypernet.config.extra["steps"] == "2"
    assert image.shape[-1] == 3
    assert (tmp_path / "output" / "lorarar_training" / "tiny_test" / "train_log.jsonl").is_file()
