"""The logic behind the ComfyUI nodes (`hypernet.nodelogic`, `hypernet.nodelogic.lazy`, `hypernet.nodelogic.plot`),
without ComfyUI: LORA_MODEL handling, caches, errors that name the input, the patch plan's
algebra, saving, hypernetwork choices/downloads and the coefficient plot."""

from __future__ import annotations

import copy
import http.server
import pickle
import shutil
import threading

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from hypernet import catalog, naming
from hypernet.errors import HypernetError, LoraFormatError, LoraMismatchError, LoraRarError
from hypernet.lora import read_lora
from hypernet.model import HypernetConfig, HyperNetwork, save_hypernet
from hypernet.nodelogic import cache as cache_logic
from hypernet.nodelogic import hypernet as hypernet_logic
from hypernet.nodelogic import lora as lora_logic
from hypernet.nodelogic import merge as merge_logic
from hypernet.nodelogic import plot
from hypernet.nodelogic.lazy import LazyMergedLora, LoadedLora
from hypernet.safetensors_io import sha256_file
from hypernet.tooling import synthetic
from tests.support.files import OFFICIAL_SDXL


def tiny_sdxl_shapes(te_layers: int = 1) -> dict[str, tuple[int, int]]:
    """SDXL's layer names (all 11 transformer blocks, depth 1) at widths 64/128 and SDXL's
    2048-wide context: fast, and still SDXL to the family detection."""
    shapes = {}
    for block, width, _ in naming.SDXL_TRANSFORMER_BLOCKS:
        w = width // 10
        shapes[f"{block}.proj_in"] = (w, w)
        prefix = f"{block}.transformer_blocks.0"
        for attn in ("attn1", "attn2"):
            for proj in naming.ATTENTION_PROJECTIONS:
                wide = attn == "attn2" and proj in ("to_k", "to_v")
                shapes[f"{prefix}.{attn}.{proj}"] = (w, naming.SDXL_CONTEXT_DIM if wide else w)
        shapes[f"{prefix}.ff.net.0.proj"] = (8 * w, w)
        shapes[f"{prefix}.ff.net.2"] = (w, 4 * w)
        shapes[f"{block}.proj_out"] = (w, w)
    for name, (out, inp) in synthetic.text_encoder_layers(te_layers).items():
        shapes[name] = (out // 8, inp // 8)
    return shapes


SHAPES = tiny_sdxl_shapes()


def tiny_lora(seed: int, rank: int = 4, family: str = "kohya", alpha: float | None = None,
              skip: str = "") -> dict[str, torch.Tensor]:
    shapes = {n: s for n, s in SHAPES.items() if not (skip and n.endswith(skip))}
    return synthetic.to_state_dict(synthetic.random_factors(shapes, rank, seed), family, alpha)


def tiny_hypernet(seed: int = 3) -> HyperNetwork:
    model = HyperNetwork(HypernetConfig(widths=(64, 128), extra={"purpose": "tests"}))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return model


@pytest.fixture()
def pair():
    return tiny_lora(1, rank=4, alpha=2.0, skip="ff.net.2"), tiny_lora(2, rank=8, family="comfyui", skip="proj_in")


# ---------------------------------------------------------------------------------------------
# LazyMergedLora / LoadedLora

def merged_of(pair, cs=1.0, ss=1.0):
    return merge_logic.run_merge(pair[0], pair[1], tiny_hypernet(), cs, ss, "lorarar")


def test_lazy_merged_lora_knows_its_keys_without_building(pair):
    result = merged_of(pair)
    lazy = LazyMergedLora.from_merged(result)
    expected = result.to_state_dict()
    assert len(lazy) == len(expected) and list(lazy) == list(expected)
    assert "lora_unet_input_blocks_4_1_proj_in.lora_up.weight" in lazy and "nope" not in lazy
    assert set(lazy.keys()) == set(expected)
    assert not lazy.is_materialised and "not built" in repr(lazy)
    first_key = next(iter(expected))
    assert torch.equal(lazy[first_key], expected[first_key])
    assert lazy.is_materialised
    assert all(torch.equal(lazy[k], v) for k, v in expected.items())


@pytest.mark.parametrize("how", ["dict", "unpack", "items", "values", "get", "pickle", "copy", "or", "save_file"])
def test_lazy_merged_lora_behaves_like_the_plain_dict(pair, how, tmp_path):
    result = merged_of(pair)
    expected = result.to_state_dict()
    lazy = LazyMergedLora.from_merged(result)
    if how == "dict":
        out = dict(lazy)
    elif how == "unpack":
        out = {**lazy}
    elif how == "items":
        out = {k: v for k, v in lazy.items()}
    elif how == "values":
        out = dict(zip(lazy.keys(), lazy.values()))
    elif how == "get":
        out = {k: lazy.get(k) for k in lazy}
    elif how == "pickle":
        out = pickle.loads(pickle.dumps(lazy))
        assert type(out) is dict
    elif how == "copy":
        out = copy.copy(lazy)
    elif how == "or":
        out = lazy | {}
    else:  # what core's "Save LoRA" node does with a LORA_MODEL
        save_file(lazy, str(tmp_path / "x.safetensors"))
        with safe_open(str(tmp_path / "x.safetensors"), "pt") as f:
            out = {k: f.get_tensor(k) for k in f.keys()}
    assert out.keys() == expected.keys()
    assert all(torch.equal(out[k], v) for k, v in expected.items())


def test_editing_a_lazy_merged_lora_drops_its_provenance(pair):
    result = merged_of(pair)
    lazy = merge_logic.merged_lora_output(result, pair[0], pair[1], tiny_hypernet())
    assert lazy.provenance is not None
    key = next(iter(lazy))
    lazy[key] = lazy[key] * 2
    assert lazy.provenance is None  # the merge metadata no longer describes it
    assert torch.equal(lazy[key], result.to_state_dict()[key] * 2)


def test_identity_cache_keys_by_object_not_by_value():
    cache = cache_logic.IdentityCache(size=2)
    a, b, c = {"x": 1}, {"x": 1}, {"y": 2}
    calls = []
    compute = lambda tag: (lambda: calls.append(tag) or tag)  # noqa: E731
    assert cache.get_or_compute((a,), compute("a")) == "a"
    assert cache.get_or_compute((a,), compute("again")) == "a"
    assert cache.get_or_compute((b,), compute("b")) == "b"   # equal value, other object: a miss
    assert cache.get_or_compute((c,), compute("c")) == "c"   # evicts a (least recently used)
    assert cache.get_or_compute((a,), compute("a2")) == "a2"
    assert calls == ["a", "b", "c", "a2"] and cache.hits == 1


def test_merge_cache_lets_go_when_comfyui_frees_the_inputs(tmp_path, pair):
    """The node's merge cache holds its inputs weakly: once ComfyUI drops a LoRA node's output (its
    cache settings, a new file), the merge built on it is freed, not kept for the process's life."""
    import gc
    import weakref

    path = tmp_path / "subject.safetensors"
    save_file(pair[0], str(path))
    merge_logic._MERGES.clear()
    loaded = lora_logic.load_lora_model(path)
    merged = merge_logic.run_merge(loaded, pair[1], None, 1, 1, "sum")
    freed = weakref.ref(merged.layers[next(iter(merged.layers))])
    assert len(merge_logic._MERGES) == 1
    del loaded, merged
    gc.collect()
    assert len(merge_logic._MERGES) == 0 and freed() is None
    # plain dicts (from core nodes) cannot be held weakly: they are held, and evicted by size
    plain = dict(pair[0])
    merge_logic.run_merge(plain, pair[1], None, 1, 1, "sum")
    assert len(merge_logic._MERGES) == 1


def test_loaded_lora_is_parsed_once_and_plain_dicts_are_cached_by_identity(tmp_path, pair):
    path = tmp_path / "subject.safetensors"
    save_file(pair[0], str(path))
    loaded = lora_logic.load_lora_model(path, "subject.safetensors")
    assert isinstance(loaded, LoadedLora) and dict(loaded).keys() == pair[0].keys()
    assert lora_logic.lora_file_of(loaded, "content LoRA") is loaded.lora_file
    assert loaded.lora_file.source == "subject.safetensors"
    first = lora_logic.lora_file_of(pair[1], "style LoRA")
    assert lora_logic.lora_file_of(pair[1], "style LoRA") is first
    assert lora_logic.lora_file_of(dict(pair[1]), "style LoRA") is not first


def test_load_lora_errors_name_the_file(tmp_path):
    not_lora = tmp_path / "vae.safetensors"
    save_file({"encoder.conv_in.weight": torch.zeros(4, 3, 3, 3)}, str(not_lora))
    with pytest.raises(LoraFormatError, match=r"vae\.safetensors.*no LoRA layers"):
        lora_logic.load_lora_model(not_lora, "vae.safetensors")
    truncated = tmp_path / "cut.safetensors"
    good = tmp_path / "good.safetensors"
    save_file(tiny_lora(1), str(good))
    truncated.write_bytes(good.read_bytes()[:2000])
    with pytest.raises(LoraFormatError, match=r"cut\.safetensors"):
        lora_logic.load_lora_model(truncated)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_values_are_refused_on_every_load_path_with_one_message(tmp_path, bad):
    """The node's file loader, a LORA_MODEL from another node and the CLI/library reader read
    through one function: the same check, the same message, naming the input."""
    poisoned = tiny_lora(1)
    key = next(k for k in poisoned if k.endswith("lora_down.weight"))
    poisoned[key] = poisoned[key].clone()
    poisoned[key][0, 0] = bad
    path = tmp_path / "poisoned.safetensors"
    save_file(poisoned, str(path))
    message = r"contain NaN or Inf values \(first: .*\); the file is damaged or was saved from a diverged"
    with pytest.raises(LoraFormatError, match=r"^poisoned\.safetensors: 1 layer\(s\) " + message):
        lora_logic.load_lora_model(path, "poisoned.safetensors")
    with pytest.raises(LoraFormatError, match=r"^style LoRA: 1 layer\(s\) " + message):
        merge_logic.run_merge(tiny_lora(2), poisoned, None, 1, 1, "sum")
    with pytest.raises(LoraFormatError, match=rf"^{path}: 1 layer\(s\) " + message):
        read_lora(path)


def test_non_tensor_lora_model_names_the_input():
    with pytest.raises(LoraFormatError, match=r"^content LoRA: entry 'a' is not a tensor"):
        merge_logic.run_merge({"a": 3}, tiny_lora(2), None, 1, 1, "sum")
    with pytest.raises(LoraFormatError, match=r"^style LoRA: expected a LoRA state dict"):
        merge_logic.run_merge(tiny_lora(1), [1, 2], None, 1, 1, "sum")


def sd15_like_lora() -> dict[str, torch.Tensor]:
    shapes = {}
    for block, width in (("input_blocks.1.1", 320), ("input_blocks.4.1", 640)):
        prefix = f"{block}.transformer_blocks.0"
        shapes[f"{prefix}.attn1.to_q"] = (width, width)
        shapes[f"{prefix}.attn2.to_k"] = (width, 768)
    return synthetic.to_state_dict(synthetic.random_factors(shapes, 2, 5), "kohya")


def test_a_non_sdxl_lora_is_refused_naming_the_input_and_the_hypernetwork_widths():
    with pytest.raises(LoraFormatError) as info:
        merge_logic.run_merge(tiny_lora(1), sd15_like_lora(), tiny_hypernet(), 1, 1, "lorarar")
    message = str(info.value)
    assert message.startswith("style LoRA") and "SD1.5" in message and "320" in message
    assert "widths 64/128" in message
    with pytest.raises(LoraMismatchError, match=r"^content LoRA.*SD1\.5.* but style LoRA.*SDXL.*one base model"):
        merge_logic.run_merge(sd15_like_lora(), tiny_lora(1), None, 1, 1, "sum")


def test_lorarar_without_hypernetwork_and_unknown_method_are_clear_errors(pair):
    with pytest.raises(HypernetError, match=r"^hypernetwork: method 'lorarar' needs a hypernetwork"):
        merge_logic.run_merge(pair[0], pair[1], None, 1, 1, "lorarar")
    with pytest.raises(LoraRarError, match=r"^method: expected one of lorarar, np-lora, k-lora, sum"):
        merge_logic.run_merge(pair[0], pair[1], None, 1, 1, "average")


# ---------------------------------------------------------------------------------------------
# Merge caching and the patch plan

def test_changing_strengths_reuses_the_coefficients(pair):
    hypernet = tiny_hypernet()
    merge_logic._MERGES.clear()
    first = merge_logic.run_merge(pair[0], pair[1], hypernet, 1.0, 1.0, "lorarar")
    misses = merge_logic._MERGES.misses
    second = merge_logic.run_merge(pair[0], pair[1], hypernet, 0.5, 2.0, "lorarar")
    assert merge_logic._MERGES.misses == misses
    assert second.coefficients is first.coefficients
    name = "middle_block.1.transformer_blocks.0.attn2.to_q"
    assert name in first.coefficients
    c_only = merge_logic.run_merge(pair[0], pair[1], hypernet, 1.0, 0.0, "lorarar").delta(name)
    s_only = merge_logic.run_merge(pair[0], pair[1], hypernet, 0.0, 1.0, "lorarar").delta(name)
    assert torch.allclose(second.delta(name), 0.5 * c_only + 2.0 * s_only, atol=1e-6)
    # Another hypernetwork (or other LoRA objects) does run it again.
    merge_logic.run_merge(pair[0], pair[1], tiny_hypernet(seed=4), 1.0, 1.0, "lorarar")
    assert merge_logic._MERGES.misses == misses + 1


def plan_delta(plan, name: str) -> torch.Tensor:
    """What ComfyUI adds to a weight for the plan: Σ strength · (alpha/rank) · up @ down + diffs."""
    key = naming.ldm_to_kohya_key(name)
    total = None
    for state_dict, strength in plan:
        if f"{key}.diff" in state_dict:
            part = strength * state_dict[f"{key}.diff"].float()
        elif f"{key}.lora_up.weight" in state_dict:
            up, down = state_dict[f"{key}.lora_up.weight"].float(), state_dict[f"{key}.lora_down.weight"].float()
            alpha = state_dict.get(f"{key}.alpha")
            scale = float(alpha) / down.shape[0] if alpha is not None else 1.0
            part = strength * scale * (up.flatten(1) @ down.flatten(1)).reshape(up.shape[0], *down.shape[1:])
        else:
            continue
        total = part if total is None else total + part
    return total


@pytest.mark.parametrize("method", ["lorarar", "sum"])
def test_patch_plan_adds_up_to_the_merged_delta_without_copying_factors(pair, method):
    result = merge_logic.run_merge(pair[0], pair[1], tiny_hypernet() if method == "lorarar" else None,
                                 0.7, 1.4, method)
    plan = merge_logic.patch_plan(result)
    assert [s for _, s in plan] == [0.7, 1.4]
    for name in result.layers:
        assert torch.allclose(plan_delta(plan, name), result.delta(name), atol=1e-7, rtol=1e-5), name
    content, style = lora_logic.lora_file_of(pair[0], "content LoRA"), lora_logic.lora_file_of(pair[1], "style LoRA")
    name = "output_blocks.3.1.transformer_blocks.0.ff.net.0.proj"  # summed: passed through as is
    key = naming.ldm_to_kohya_key(name)
    assert plan[0][0][f"{key}.lora_up.weight"] is content.layers[name].up
    assert plan[1][0][f"{key}.lora_down.weight"] is style.layers[name].down
    assert "lora_unet_input_blocks_4_1_proj_in.lora_up.weight" not in plan[1][0]  # content-only layer


def test_patch_plan_options(pair):
    result = merge_logic.run_merge(pair[0], pair[1], tiny_hypernet(), 1.0, 0.0, "lorarar")
    plan = merge_logic.patch_plan(result, include_text_encoders=False)
    assert len(plan) == 1 and plan[0][1] == 1.0  # style strength 0: its side is left out
    assert not any(k.startswith("lora_te") for k in plan[0][0])
    assert any(k.startswith("lora_te") for k in merge_logic.patch_plan(result)[0][0])


def test_layers_without_low_rank_form_go_in_as_diffs(pair):
    content = dict(pair[0])
    name = "input_blocks.7.1.transformer_blocks.0.attn1.to_q"  # a hypernetwork layer, made LoHa
    key = naming.ldm_to_kohya_key(name)
    out, inp = SHAPES[name]
    gen = torch.Generator().manual_seed(9)
    for k in (".lora_up.weight", ".lora_down.weight", ".alpha"):
        content.pop(key + k, None)
    content.update({f"{key}.hada_w1_a": torch.randn(out, 2, generator=gen) * 0.1,
                    f"{key}.hada_w1_b": torch.randn(2, inp, generator=gen) * 0.1,
                    f"{key}.hada_w2_a": torch.randn(out, 2, generator=gen) * 0.1,
                    f"{key}.hada_w2_b": torch.randn(2, inp, generator=gen) * 0.1})
    result = merge_logic.run_merge(content, pair[1], tiny_hypernet(), 0.9, 1.1, "lorarar")
    assert name in result.coefficients  # the hypernetwork scaled the LoHa side's columns too
    plan = merge_logic.patch_plan(result)
    # each side stays its own patch at its strength: the LoHa side in its own form, for ComfyUI's
    # LoHa adapter, with the columns folded into hada_w1_b — never a dense out x in difference
    assert [s for _, s in plan] == [0.9, 1.1]
    assert {f"{key}.hada_w1_a", f"{key}.hada_w1_b", f"{key}.hada_w2_a", f"{key}.hada_w2_b"} <= plan[0][0].keys()
    assert f"{key}.diff" not in plan[0][0] and f"{key}.lora_up.weight" not in plan[0][0]
    assert f"{key}.lora_up.weight" in plan[1][0]
    loha = {k[len(key) + 1:]: v.double() for k, v in plan[0][0].items() if k.startswith(key)}
    content_delta = (loha["hada_w1_a"] @ loha["hada_w1_b"]) * (loha["hada_w2_a"] @ loha["hada_w2_b"])
    up, down = plan[1][0][f"{key}.lora_up.weight"].double(), plan[1][0][f"{key}.lora_down.weight"].double()
    style_delta = up @ down * float(plan[1][0][f"{key}.alpha"]) / down.shape[0]
    torch.testing.assert_close(0.9 * content_delta + 1.1 * style_delta, result.delta(name).double(), rtol=1e-5, atol=1e-8)


# ---------------------------------------------------------------------------------------------
# Saving

@pytest.mark.parametrize("prefix, expected", [
    ("lorarar/merged", "lorarar/merged"), ("my merge", "my merge"), ("  a//b/./c  ", "a/b/c"),
    ("sub\\name", "sub/name"), ("we:ird*na?me", "we_ird_na_me"), ("x.safetensors", "x"), ("", "lorarar/merged"),
])
def test_sanitise_prefix(prefix, expected):
    assert str(lora_logic.sanitise_prefix(prefix)) == expected


@pytest.mark.parametrize("prefix", ["../up", "a/../../b", "/etc/x", "C:\\loras\\x", "~/x", "..\\x"])
def test_sanitise_prefix_refuses_leaving_the_folder(prefix):
    with pytest.raises(LoraRarError, match="filename_prefix"):
        lora_logic.sanitise_prefix(prefix)


def test_save_never_overwrites_and_streams_the_merge_with_provenance(tmp_path, pair):
    loras = tmp_path / "loras"
    (loras / "lorarar").mkdir(parents=True)
    content_path = tmp_path / "subject.safetensors"
    save_file(pair[0], str(content_path))
    content = lora_logic.load_lora_model(content_path)
    hypernet_path = tmp_path / "tiny_hypernet.safetensors"
    save_hypernet(tiny_hypernet(), hypernet_path)
    hypernet = hypernet_logic.load_hypernet_cached(hypernet_path)
    result = merge_logic.run_merge(content, pair[1], hypernet, 1.0, 0.5, "lorarar")
    lazy = merge_logic.merged_lora_output(result, content, pair[1], hypernet)
    existing = loras / "lorarar" / "merged_00001.safetensors"
    existing.write_bytes(b"someone else's file")
    path = lora_logic.save_lora_model(lazy, loras, "lorarar/merged", "fp32")
    assert path == loras / "lorarar" / "merged_00002.safetensors"
    assert existing.read_bytes() == b"someone else's file"
    assert not lazy.is_materialised  # streamed from the merge, never built as a dict
    saved = read_lora(path)
    meta = saved.metadata
    assert meta["lorarar.method"] == "lorarar" and meta["lorarar.style_strength"] == "0.5"
    assert meta["lorarar.content"] == "subject.safetensors"
    assert meta["lorarar.content_sha256"] == sha256_file(content_path)
    assert meta["lorarar.hypernet_sha256"] == sha256_file(hypernet_path)
    assert "lorarar.style_sha256" not in meta  # the style came from a node, not a file
    for name in result.layers:
        assert torch.allclose(saved.layers[name].delta(), result.delta(name), atol=1e-7)
    second = lora_logic.save_lora_model(lazy, loras, "lorarar/merged", "fp16")
    assert second.name == "merged_00003.safetensors"
    with safe_open(str(second), "pt") as f:
        dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}
    assert {d for k, d in dtypes.items() if k.endswith("weight")} == {"F16"}
    assert {d for k, d in dtypes.items() if k.endswith("alpha")} == {"F32"}


def test_save_a_plain_lora_model(tmp_path):
    state_dict = tiny_lora(1, alpha=4.0)
    path = lora_logic.save_lora_model(state_dict, tmp_path, "core/trained", "bf16")
    assert path == tmp_path / "core" / "trained_00001.safetensors"
    with safe_open(str(path), "pt") as f:
        assert set(f.keys()) == set(state_dict)
        assert "not a LoRA.rar merge" in f.metadata()["lorarar.note"]
        key = next(k for k in f.keys() if k.endswith("lora_up.weight"))
        assert f.get_tensor(key).dtype == torch.bfloat16
        assert torch.allclose(f.get_tensor(key).float(), state_dict[key], rtol=1e-2)
    with pytest.raises(LoraRarError, match="dtype"):
        lora_logic.save_lora_model(state_dict, tmp_path, "x", "fp8")


# ---------------------------------------------------------------------------------------------
# Hypernetworks

def test_hypernet_choices_always_offer_the_official_checkpoint_first():
    official = catalog.load_catalog()["lorarar-sdxl"].file
    assert hypernet_logic.hypernet_choices([]) == [official]
    listed = ["b.safetensors", official, "a.pth", "notes.txt", "sub/c.safetensors"]
    assert hypernet_logic.hypernet_choices(listed) == [official, "a.pth", "b.safetensors", "sub/c.safetensors"]
    assert "CC BY-NC-SA" in hypernet_logic.hypernet_file_tooltip() and "CC BY-NC-SA" in hypernet_logic.download_tooltip()


def test_hypernet_choices_list_only_files_whose_header_says_hypernetwork(tmp_path):
    """The pack's weights/ folder also holds the testbed's model and LoRAs: with the file lookup,
    only hypernetworks are offered (read from the header: cheap), a .pth by its extension."""
    official = catalog.load_catalog()["lorarar-sdxl"].file
    save_hypernet(tiny_hypernet(), tmp_path / "mine.safetensors")
    save_file({"weight": torch.zeros(2)}, str(tmp_path / "base.safetensors"))   # a model, not a hypernet
    save_file(tiny_lora(1), str(tmp_path / "sks4.safetensors"))                 # a LoRA
    (tmp_path / "broken.safetensors").write_bytes(b"\x05\x00")                 # not even safetensors
    (tmp_path / "theirs.pth").write_bytes(b"x")
    names = ["mine.safetensors", "base.safetensors", "sks4.safetensors", "broken.safetensors", "theirs.pth", "gone.safetensors"]
    found = {n: str(tmp_path / n) if (tmp_path / n).exists() else None for n in names}
    assert hypernet_logic.hypernet_choices(names, found.get) == [official, "mine.safetensors", "theirs.pth"]


def test_hypernet_cache_by_path_mtime_and_size(tmp_path):
    path = tmp_path / "mine.safetensors"
    save_hypernet(tiny_hypernet(1), path)
    first = hypernet_logic.load_hypernet_cached(path)
    assert hypernet_logic.load_hypernet_cached(path) is first
    save_hypernet(tiny_hypernet(2), path, force=True)
    second = hypernet_logic.load_hypernet_cached(path)
    assert second is not first
    assert not torch.equal(second.output[1].weight, first.output[1].weight)


def test_a_file_named_like_the_official_checkpoint_must_match_its_sha256(tmp_path):
    fake = tmp_path / catalog.load_catalog()["lorarar-sdxl"].file
    torch.save({"input_1.weight": torch.zeros(2, 2)}, fake)
    with pytest.raises(HypernetError, match="sha256"):
        hypernet_logic.load_hypernet_cached(fake)


def test_missing_official_checkpoint_without_download_explains_where_and_the_license(tmp_path):
    name = catalog.load_catalog()["lorarar-sdxl"].file
    with pytest.raises(HypernetError) as info:
        hypernet_logic.resolve_hypernet_choice(name, None, False, tmp_path / "lorarar", [tmp_path / "lorarar"])
    message = str(info.value)
    assert "not installed" in message and "'download'" in message and "CC BY-NC-SA 4.0" in message
    assert str(tmp_path / "lorarar") in message
    with pytest.raises(HypernetError, match="not found"):
        hypernet_logic.resolve_hypernet_choice("other.pth", None, True, tmp_path, [tmp_path])


class _FileServer:
    def __init__(self, payload: bytes):
        payload_bytes = payload

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                self.send_response(200)
                self.send_header("Content-Length", str(len(payload_bytes)))
                self.end_headers()
                self.wfile.write(payload_bytes)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hypernet.pth"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def test_opt_in_download_is_sha256_checked(tmp_path):
    entry = catalog.load_catalog()["lorarar-sdxl"]
    target = tmp_path / "lorarar"
    with _FileServer(b"x" * entry.bytes) as server:  # right size, wrong bytes
        with pytest.raises(HypernetError, match="sha256"):
            hypernet_logic.resolve_hypernet_choice(entry.file, None, True, target, [target], url=server.url)
    assert not (target / entry.file).exists() and not list(target.glob("*.tmp"))
    if not OFFICIAL_SDXL.is_file():
        pytest.skip("official checkpoint absent: only the refusal was tested")
    done = []
    with _FileServer(OFFICIAL_SDXL.read_bytes()) as server:
        model = hypernet_logic.resolve_hypernet_choice(entry.file, None, True, target, [target],
                                                  progress=lambda d, t: done.append((d, t)), url=server.url)
    assert (target / entry.file).is_file() and done[-1] == (entry.bytes, entry.bytes)
    assert model.config.name == "lorarar-sdxl" and "CC BY-NC-SA" in model.config.license
    assert model.widths == (640, 1280)


def test_official_checkpoint_in_a_folder_is_found_and_verified(tmp_path):
    if not OFFICIAL_SDXL.is_file():
        pytest.skip(f"official checkpoint not at {OFFICIAL_SDXL}")
    folder = tmp_path / "lorarar"
    folder.mkdir()
    local = folder / OFFICIAL_SDXL.name
    shutil.copyfile(OFFICIAL_SDXL, local)  # a temp copy only; never into the repository
    model = hypernet_logic.resolve_hypernet_choice(local.name, local, False, folder, [folder])
    assert model.config.base_family == "sdxl" and model.source_path == local


# ---------------------------------------------------------------------------------------------
# Coefficient plot

def fake_sdxl_coefficients() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    coefficients = {}
    for name, (_, inp) in naming.sdxl_linear_layers().items():
        if name.endswith(("attn1.to_q", "attn1.to_out.0", "attn2.to_q", "attn2.to_out.0")):
            block = naming.transformer_block_of(name)
            level = naming.unet_block_order_key(block)[0]  # 0 in, 1 mid, 2 out
            coefficients[name] = (torch.full((inp,), 1.0 - 0.5 * level), torch.full((inp,), 0.25 * level))
    return coefficients


def test_block_means_in_unet_order():
    coefficients = fake_sdxl_coefficients()
    coefficients["input_blocks.4.1.transformer_blocks.0.attn1.to_q"] = (torch.tensor([3.0, 5.0]), torch.tensor([0.0, 2.0]))
    means = plot.block_means(coefficients)
    assert len(means) == 70
    assert [m.block for m in means][:2] == ["input_blocks.4.1"] * 2 and means[-1].block == "output_blocks.5.1"
    assert [m.index for m in means if m.block == "middle_block.1"] == list(range(10))
    first = means[0]  # to_q (2 columns: mean 4) + three 640-column matrices at 1.0
    assert first.content == pytest.approx((3 + 5 + 3 * 640 * 1.0) / (2 + 3 * 640))
    assert {round(m.content, 6) for m in means if m.block == "middle_block.1"} == {0.5}
    assert plot.short_block_label("output_blocks.3.1") == "out 3"


def test_coefficient_plot_draws_both_series():
    image = plot.coefficient_plot(plot.block_means(fake_sdxl_coefficients()), "LoRA.rar merge", "test")
    assert image.size == (1024, 512)
    colours = {c for _, c in image.getcolors(maxcolors=1 << 16)}
    assert plot.CONTENT_COLOUR in colours and plot.STYLE_COLOUR in colours
    tensor = plot.image_to_tensor(image)
    assert tensor.shape == (1, 512, 1024, 3) and tensor.dtype == torch.float32
    assert 0.0 <= tensor.min() and tensor.max() <= 1.0
    empty = plot.coefficient_plot([], "LoRA.rar sum merge")
    assert plot.CONTENT_COLOUR not in {c for _, c in empty.getcolors(maxcolors=1 << 16)}


def test_merge_plot_title_names_inputs(pair):
    result = merge_logic.run_merge(pair[0], pair[1], tiny_hypernet(), 1.0, 0.8, "lorarar")
    title, subtitle = merge_logic.plot_title(result, "dog.safetensors", "watercolor.safetensors", "tiny")
    assert "lorarar" in title and "tiny" in title
    assert "dog.safetensors x1" in subtitle and "watercolor.safetensors x0.8" in subtitle


def test_node_applies_dora_as_comfyui_does_and_says_the_file_lacks_the_magnitude(tmp_path, pair):
    """In ComfyUI the model's weight is there: a DoRA layer is kept out of the method, summed, and
    handed to ComfyUI with its magnitude (its own tensors) for ComfyUI's DoRA; the merged_lora
    output cannot carry that, which the report and the saved file say."""
    content = dict(pair[0])
    name = "input_blocks.7.1.transformer_blocks.0.attn1.to_q"  # a hypernetwork layer
    key = naming.ldm_to_kohya_key(name)
    content[f"{key}.dora_scale"] = torch.rand(SHAPES[name][0], 1, generator=torch.Generator().manual_seed(4)) + 0.5
    merged = merge_logic.run_merge(content, pair[1], tiny_hypernet(), 1.0, 1.0, "lorarar")
    assert name not in merged.coefficients and merged.layers[name].content.dense.is_dora
    assert merged.report.dora_magnitude_dropped == 1
    assert any("applied to the model as ComfyUI applies DoRA" in note for note in merged.report.notes)
    content_patch = merge_logic.patch_plan(merged)[0][0]
    assert torch.equal(content_patch[f"{key}.dora_scale"], content[f"{key}.dora_scale"])
    torch.testing.assert_close(content_patch[f"{key}.lora_up.weight"], content[f"{key}.lora_up.weight"])
    output = merge_logic.merged_lora_output(merged, content, pair[1], tiny_hypernet())
    path = lora_logic.save_lora_model(output, tmp_path, "dora/merged")
    with safe_open(str(path), "pt") as f:
        assert "1 DoRA layer(s) written WITHOUT their magnitude" in f.metadata()["lorarar.dora"]
        assert f"{key}.dora_scale" not in f.keys()
