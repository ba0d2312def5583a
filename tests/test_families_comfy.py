"""Every family against ComfyUI's own code: its key maps read the same way by our reader, merged
files written in keys it maps to the right weights, and the merge node's patches (and the K-LoRA
switcher) on each family's model, built small in code by ComfyUI's own model classes.

Needs a ComfyUI that has the families' model classes (2025 or newer): run with
`COMFYUI_PATH=/path/to/ComfyUI <its venv>/bin/python -m pytest tests/test_families_comfy.py`; on
the 2024 core of the default run only the UNet families are there, the others skip saying so.
"""

from __future__ import annotations

import inspect
import types

import pytest
import torch

from hypernet import families, naming
from hypernet.errors import LoraRarError
from hypernet.lora import lora_from_state_dict
from hypernet.model import HypernetConfig, HyperNetwork
from hypernet.nodelogic import merge as merge_logic
from tests.support.comfy_core import load_comfy
from tests.support.family_models import FULL, TINY, build, weights_of
from tests.support.tensors import tensors_in

pytestmark = pytest.mark.comfyui

FAMILIES = list(TINY)


@pytest.fixture(scope="module")
def comfy():
    return load_comfy()


@pytest.fixture(scope="module")
def pack(comfy):
    from tests.support.comfy_pack import pack_module

    return types.SimpleNamespace(merge_patches=pack_module("nodes.merge_patches", v3=False),
                                 k_lora=pack_module("nodes.k_lora_patching", v3=False))


def _config_class(comfy, name: str):
    if not hasattr(comfy.supported_models, name):
        pytest.skip(f"this ComfyUI has no {name} model (it predates the family)")
    return name


def _build(comfy, config_class: str, config: dict, device: str = "meta"):
    try:
        return build(comfy, _config_class(comfy, config_class), config, device=device)
    except KeyError as exc:  # the 2024 core's SD1.x classes need a checkpoint's keys to build
        pytest.skip(f"this ComfyUI cannot build {config_class} from a configuration alone ({exc!r})")


_TINY_CACHE: dict = {}


@pytest.fixture(scope="module", autouse=True)
def _release_models():
    """The tiny models are shared by the tests of this module and released with it (ComfyUI's
    ModelPatcher must not outlive the interpreter's teardown of comfy's modules)."""
    yield
    _TINY_CACHE.clear()


def tiny(comfy, family: str):
    """(ModelPatcher, its weights' shapes) of the family's tiny model, random weights, float32."""
    if family not in _TINY_CACHE:
        config_class, config = TINY[family]
        model = _build(comfy, config_class, config, device="cpu")
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for tensor in model.diffusion_model.state_dict().values():
                if tensor.is_floating_point():
                    tensor.copy_(torch.randn(tensor.shape, generator=gen) * 0.05)
        patcher = comfy.model_patcher.ModelPatcher(model, load_device=torch.device("cpu"),
                                                   offload_device=torch.device("cpu"))
        _TINY_CACHE[family] = (patcher, weights_of(model))
    return _TINY_CACHE[family]


def _targets(key_map: dict) -> dict[str, tuple[str, list[int] | None]]:
    """ComfyUI's LoRA key → (canonical weight, the rows of it in the LoRA's row order, or None for
    all), for the 2-D weights (ndim ≥ 2) of the diffusion model."""
    out = {}
    for key, target in key_map.items():
        offset = function = None
        if isinstance(target, tuple):
            target, offset, *rest = target
            function = rest[0] if rest else None
        if not (target.startswith("diffusion_model.") and target.endswith(".weight")) or key.startswith("lora_prior_"):
            continue  # (`lora_prior_`: Stable Cascade's prior, mapped for every model by older cores)
        name = target[len("diffusion_model."):-len(".weight")]
        rows = None
        if offset is not None:
            dim, start, length = offset
            assert dim == 0
            rows = list(range(start, start + length))
        elif function is not None:  # swap_scale_shift: the LoRA's halves in the other order
            rows = "swap"
        out[key] = (name, rows)
    return out


def _file_keys(key: str) -> tuple[str, str]:
    """The up/down keys a file has for one of ComfyUI's LoRA keys (a processor key ends `_lora`)."""
    if ".processor." in key:
        return f"{key}_lora.up.weight", f"{key}_lora.down.weight"
    return f"{key}.lora_up.weight", f"{key}.lora_down.weight"


# Where ComfyUI's map and the model disagree, the model wins: ComfyUI maps a Flux.2 `proj_mlp` to
# Flux.1's 4h MLP rows of linear1, but Flux.2's MLP input is 6h rows (mlp ratio 3, gated); no
# trainer writes it apart (diffusers' Flux.2 fuses it into to_qkv_mlp_proj).
KNOWN_DIVERGENCES = {"flux2": ("proj_mlp",)}


def _check_key_map(comfy, model, family: str) -> int:
    """Every key ComfyUI's `model_lora_keys_unet` maps to a 2-D weight of `model`, written as a file
    would write it, our reader reads to that weight and those rows (in that order). Returns how
    many keys were checked."""
    shapes = weights_of(model)
    targets = _targets(comfy.lora.model_lora_keys_unet(model, {}))
    checked, wrong = 0, []
    for key, (name, rows) in targets.items():
        if name not in shapes or len(shapes[name]) != 2 or any(d in key for d in KNOWN_DIVERGENCES.get(family, ())):
            continue
        out, inp = shapes[name]
        length = out if rows is None or rows == "swap" else len(rows)
        up_key, down_key = _file_keys(key)
        up = torch.arange(1, length + 1, dtype=torch.float32)[:, None]
        try:
            lora = lora_from_state_dict({up_key: up, down_key: torch.ones(1, inp)}, source=key, family=family,
                                        check_values=False)
        except LoraRarError as exc:
            wrong.append((key, name, str(exc)[:160]))
            continue
        got = [(n, tuple(layer.shape)) for n, layer in lora.layers.items()]
        if got != [(name, (out, inp))]:
            wrong.append((key, name, got, lora.unrecognised_keys[:1]))
            continue
        placed = lora.layers[name].up[:, 0]
        where = placed.nonzero().flatten().tolist()
        expected = list(range(out)) if rows is None else rows
        if rows == "swap":
            half = out // 2
            expected = [(i + half) % out for i in range(out)]
        # placed[r] = j + 1: the file's row j landed on the weight's row r, where ComfyUI puts it
        if len(where) != length or [expected[int(placed[r]) - 1] for r in where] != where:
            wrong.append((key, name, "rows"))
        checked += 1
    assert not wrong, wrong[:5]
    return checked


@pytest.mark.slow  # all of every published size; the default tier checks the tiny models' maps
@pytest.mark.parametrize("variant", list(FULL))
def test_every_key_comfyui_maps_reads_to_the_same_weight_and_rows(comfy, variant):
    """ComfyUI's key map for the full-size model (meta device): every key it maps to a weight —
    kohya, diffusers with their slices of fused weights (and swapped halves), OneTrainer, LyCORIS,
    bare names — our reader reads to that weight and those rows: the whole vocabulary checked
    against ComfyUI's, independently of our own naming code; and every weight's kohya key (what a
    merged file writes) maps to it."""
    family, config_class, config = FULL[variant]
    model = _build(comfy, config_class, config)
    shapes = weights_of(model)
    assert _check_key_map(comfy, model, family) > len(shapes)  # every weight, in several key forms
    key_map = comfy.lora.model_lora_keys_unet(model, {})
    assert all(key_map[naming.kohya_key(n, family)] == f"diffusion_model.{n}.weight" for n in shapes)


@pytest.mark.parametrize("family", FAMILIES)
def test_every_key_comfyui_maps_for_a_small_model_reads_to_the_same_weight_and_rows(comfy, family):
    patcher, shapes = tiny(comfy, family)
    assert _check_key_map(comfy, patcher.model, family) > len([s for s in shapes.values() if len(s) == 2])


def _lora_for(patcher, shapes: dict, family: str, seed: int, form: str, rank: int) -> dict[str, torch.Tensor]:
    """A LoRA over every 2-D weight of the tiny model: `kohya` (lora_unet_ + name, alpha), or
    `diffusers` — one of ComfyUI's own diffusers-form keys per weight part (`transformer.…` slices of
    fused weights, `unet.…` for the UNets, `diffusion_model.…` with peft suffixes where ComfyUI has
    no diffusers form)."""
    import comfy.lora

    gen = torch.Generator().manual_seed(seed)
    out = {}
    if form == "kohya":
        for name, shape in shapes.items():
            if len(shape) != 2:
                continue
            key = naming.kohya_key(name, family)
            out[f"{key}.lora_up.weight"] = torch.randn(shape[0], rank, generator=gen) * 0.05
            out[f"{key}.lora_down.weight"] = torch.randn(rank, shape[1], generator=gen) * 0.2
            out[f"{key}.alpha"] = torch.tensor(rank / 2)
        return out
    targets = _targets(comfy.lora.model_lora_keys_unet(patcher.model, {}))
    prefixes = ("transformer.", "unet.")
    chosen: dict = {}
    for key, (name, rows) in sorted(targets.items()):
        if any(d in key for d in KNOWN_DIVERGENCES.get(family, ())):
            continue
        if name in shapes and len(shapes[name]) == 2 and key.startswith(prefixes) and rows != "swap":
            chosen.setdefault((name, tuple(rows) if rows else None), key)
    if not chosen:  # Wan, Qwen-Image: no diffusers form in ComfyUI; ai-toolkit's ComfyUI form
        chosen = {(name, None): f"diffusion_model.{name}" for name, shape in shapes.items() if len(shape) == 2}
    for (name, rows), key in chosen.items():
        length = len(rows) if rows else shapes[name][0]
        out[f"{key}.lora_B.weight"] = torch.randn(length, rank, generator=gen) * 0.05
        out[f"{key}.lora_A.weight"] = torch.randn(rank, shapes[name][1], generator=gen) * 0.2
    return out


def _base(patcher) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in patcher.model.diffusion_model.state_dict().items()}


def _patched(patcher) -> dict[str, torch.Tensor]:
    patcher.patch_model()
    try:
        return {k: v.detach().clone() for k, v in patcher.model.diffusion_model.state_dict().items()}
    finally:
        patcher.unpatch_model()


def _assert_patched(merged, patched: dict, base: dict) -> None:
    for name in merged.layers:
        key = f"{name}.weight"
        expected = base[key] + merged.delta(name).reshape(base[key].shape)
        error = (patched[key] - expected).abs().max().item()
        assert error <= 1e-6 + 1e-5 * expected.abs().max().item(), f"{name}: off by {error}"
    untouched = [k for k in base if k[: -len(".weight")] not in merged.layers]
    assert all(torch.equal(patched[k], base[k]) for k in untouched)


def _hypernet(family: str, merged_names: list[str], shapes: dict) -> HyperNetwork:
    from hypernet.methods.lorarar import is_hypernet_target

    widths = sorted({shapes[n][0] for n in merged_names if is_hypernet_target(n, ("to_q", "to_out.0"), family)})
    h = HyperNetwork(HypernetConfig(hidden=16, widths=tuple(widths), base_family=family))
    with torch.no_grad():
        for p in h.parameters():
            p.normal_(0, 0.3, generator=torch.Generator().manual_seed(5))
    return h


@pytest.mark.parametrize("method", ["sum", "np-lora", "lorarar"])
@pytest.mark.parametrize("family", FAMILIES)
def test_the_merge_node_patches_every_family_exactly(comfy, pack, family, method):
    """A kohya content LoRA and a diffusers-form style LoRA (ComfyUI's own keys: slices of fused
    weights where the model fuses them) of the family's model, merged as the node merges them —
    the family from the inputs and the MODEL — and applied: every patched weight is base + the
    merged ΔW, the others untouched; the merged file's keys all map in ComfyUI to weights of the
    merged layers' shapes, and core's loader patches the same from it."""
    patcher, shapes = tiny(comfy, family)
    content = _lora_for(patcher, shapes, family, 1, "kohya", 2)
    style = _lora_for(patcher, shapes, family, 2, "diffusers", 3)
    model_family = pack.merge_patches.model_family(patcher)
    assert model_family == family or (family == "sd2" and model_family == "sd2")
    hypernet = None
    if method == "lorarar":
        names = list(lora_from_state_dict(content, family=family).layers)
        hypernet = _hypernet(family, names, shapes)
    merged = merge_logic.run_merge(content, style, hypernet, 0.8, 1.2, method, model_family=model_family)
    assert merged.family == family and len(merged.layers) == len([s for s in shapes.values() if len(s) == 2])
    if method == "lorarar":
        assert merged.report.method_layers > 0
    base = _base(patcher)
    model, _ = pack.merge_patches.apply_merged(patcher, None, merged)
    _assert_patched(merged, _patched(model), base)
    key_map = comfy.lora.model_lora_keys_unet(patcher.model, {})
    state_dict = merged.to_state_dict()
    modules = {k.rsplit(".", 2)[0] if k.endswith((".lora_up.weight", ".lora_down.weight")) else k.rsplit(".", 1)[0]
               for k in state_dict}
    assert modules <= key_map.keys(), sorted(modules - key_map.keys())[:3]
    for name in merged.layers:
        assert key_map[naming.kohya_key(name, family)] == f"diffusion_model.{name}.weight"
    loaded, _ = comfy.sd.load_lora_for_models(patcher, None, state_dict, 1.0, 1.0)
    _assert_patched(merged, _patched(loaded), base)
    assert all(torch.equal(v, base[k]) for k, v in patcher.model.diffusion_model.state_dict().items())


@pytest.mark.parametrize("method", ["sum", "np-lora"])
def test_sliced_layers_survive_the_dynamic_vram_prefetch(comfy, pack, method):
    """Flux layers read from a diffusers-form file are held as their pieces (hypernet/row_blocks.py).
    The merge node's adapter for such a layer, rebuilt the way dynamic VRAM's prefetch rebuilds it
    (core's `prefetch_prepared_value` where this ComfyUI has it: every tensor copied into one
    buffer, the rest passed through), has every piece moved and patches base + the merged ΔW."""
    import comfy.lora

    if not hasattr(comfy, "weight_adapter"):
        pytest.skip("this ComfyUI (2024) has no weight adapters: merged layers are patched per side")
    patcher, shapes = tiny(comfy, "flux1")
    content = _lora_for(patcher, shapes, "flux1", 5, "kohya", 2)
    style = _lora_for(patcher, shapes, "flux1", 6, "diffusers", 3)
    merged = merge_logic.run_merge(content, style, None, 0.7, 1.1, method, model_family="flux1")
    model, _ = pack.merge_patches.apply_merged(patcher, None, merged)
    base = _base(patcher)
    sliced = 0
    for name in merged.layers:
        key = f"diffusion_model.{name}.weight"
        (strength, adapter, strength_model, offset, function), = model.patches[key]
        if hasattr(comfy.lora, "prefetch_prepared_value"):
            counter = [0]
            comfy.lora.prefetch_prepared_value(adapter, counter, None, None, False)
            buffer = torch.empty(counter[0], dtype=torch.uint8)
            rebuilt = comfy.lora.prefetch_prepared_value(adapter, [0], buffer, None, True)
            tensors = tensors_in(rebuilt.weights)
            assert tensors and all(t.untyped_storage().data_ptr() == buffer.untyped_storage().data_ptr()
                                   for t in tensors), name  # nothing left behind in the pieces' memory
        else:
            rebuilt = type(adapter)(adapter.loaded_keys, adapter.weights)
        sliced += any(isinstance(up, tuple) for up, *_ in rebuilt.weights)
        weight = base[key[len("diffusion_model."):]]
        patched = comfy.lora.calculate_weight([(strength, rebuilt, strength_model, offset, function)],
                                              weight.clone(), key)
        expected = weight + merged.delta(name).reshape(weight.shape)
        assert (patched - expected).abs().max() <= 1e-6 + 1e-5 * expected.abs().max(), name
    assert sliced >= 2  # the fused weights' layers (qkv, linear1) were held as pieces


def _callback_form(model):
    return len(inspect.signature(model.prepare_state).parameters)


@pytest.mark.parametrize("mode", ["exchange", "per-cast"])
@pytest.mark.parametrize("family", ["flux1", "sd3", "qwen_image", "z_image", "wan", "sd15"])
def test_the_k_lora_switcher_switches_each_family_exactly(comfy, pack, family, mode, monkeypatch):
    """The scheduled MODEL driven as a sampler drives it: at every call each weight is base + the
    side the schedule gives at that progress — on Flux the single blocks' linear1 switches its q/k/v
    rows only, its MLP-input rows stay the sum."""
    import comfy.model_patcher

    if not hasattr(comfy.model_patcher.ModelPatcher, "prepare_state"):
        pytest.skip("this ComfyUI has no sampling callbacks")
    monkeypatch.setenv(pack.k_lora.SWITCH_MODE_ENV, mode)
    patcher, shapes = tiny(comfy, family)
    content = _lora_for(patcher, shapes, family, 3, "kohya", 2)
    for key in [k for k in content if k.endswith("lora_up.weight")][::3]:
        content[key] = content[key] * 4  # some layers' content stronger: switch points spread over (0, 1)
    style = _lora_for(patcher, shapes, family, 4, "diffusers", 2)
    merged = merge_logic.run_merge(content, style, None, 0.9, 1.1, "k-lora")
    switching = [n for n, p in merged.switch_points.items() if 0 < p < 1]
    assert switching, merged.switch_points
    if family == "flux1":
        assert merged.switch_rows == {f"single_blocks.{i}.linear1": (0, 3 * 64) for i in range(2)}
        assert {n.rsplit(".", 1)[0] for n in merged.switch_points} >= {"double_blocks.0.img_attn", "single_blocks.0"}
        assert not any("txt_attn" in n for n in merged.switch_points)
    base = _base(patcher)
    model, _ = pack.merge_patches.apply_merged(patcher, None, merged)
    sampling = model.get_model_object("model_sampling")
    model.patch_model()
    try:
        model.pre_run()
        for p in (0.0, 0.2, 0.45, 0.7, 0.95):
            sigma = torch.tensor([float(sampling.percent_to_sigma(p))])
            model.prepare_state(sigma, {}) if _callback_form(model) == 2 else model.prepare_state(sigma)
            for name in merged.layers:
                point = merged.switch_points.get(name)
                if point is not None and abs(p - point) < 1e-3:
                    continue
                module = patcher.model.diffusion_model.get_submodule(name) if False else _module(model, name)
                weight = module.weight.detach()
                for function in getattr(module, "weight_function", []):
                    weight = function(weight)
                expected = base[f"{name}.weight"] + merged.delta_at(name, p)
                error = (weight.float() - expected).abs().max().item()
                assert error <= 1e-6 + 1e-5 * expected.abs().max().item(), f"{name} at p={p}: off by {error}"
        model.cleanup()
    finally:
        model.unpatch_model()
    assert all(torch.equal(v, base[k]) for k, v in patcher.model.diffusion_model.state_dict().items())


def _module(patcher, name: str):
    module = patcher.model.diffusion_model
    for part in name.split("."):
        module = getattr(module, part)
    return module


@pytest.mark.parametrize("family", ["sd15", "sd2", "sdxl", "flux1", "sd3"])
def test_text_encoder_keys_map_onto_the_family_s_clip(comfy, family):
    """The merged file's text-encoder keys (`lora_te_…` for SD1.5/SD2, `lora_te1_…`…`lora_te3_…`)
    map onto the CLIP/T5 weights ComfyUI names for that family — on a stand-in holding only those
    weights' names (building the real encoders needs their tokenizers)."""
    spec = families.get(family)
    comfy_names = {"clip_l": "clip_l", "clip_g": "clip_g", "clip_h": "clip_h", "t5xxl": "t5xxl"}
    names = {}
    for encoder in spec.encoders.values():
        table = spec.encoder_table(encoder)
        for name in list(table)[:4] + list(table)[-3:]:
            names[name] = f"{comfy_names[encoder.arch]}.transformer.{name.split('.', 1)[1]}.weight"

    class StandIn(torch.nn.Module):
        def state_dict(self, *args, **kwargs):
            return {target: torch.empty(0) for target in names.values()}

    key_map = comfy.lora.model_lora_keys_clip(StandIn(), {})
    mapped = {target.split(".", 1)[0] for target in key_map.values()}
    checked = 0
    for name, target in names.items():
        if target.split(".", 1)[0] not in mapped:
            continue  # an encoder this (older) ComfyUI maps no LoRA keys for (T5 before 2024-08)
        assert key_map.get(naming.kohya_key(name, family)) == target, (name, naming.kohya_key(name, family))
        checked += 1
    assert checked
