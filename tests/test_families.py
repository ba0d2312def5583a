"""Model families as data (hypernet/families): the specs against the golden key lists made from
ComfyUI's own models, every trainer's key layout of every family read to the right weights (keys
written out literally in tests/support/family_loras.py), fused and unfused layouts of one model
merging in one space, the family of a merge settled from its inputs, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from hypernet import families
from hypernet.errors import LoraFormatError, LoraMismatchError
from hypernet.lora import lora_from_state_dict, read_lora
from hypernet.merge import merge, resolve_family
from tests.support.family_loras import LAYOUTS, PEFT, H, Layout, state_dict
from tests.support.files import write_lora

GOLDEN = sorted((Path(families.__file__).parent / "golden").glob("*.json"))


@pytest.mark.parametrize("path", GOLDEN, ids=[p.stem for p in GOLDEN])
def test_every_family_spec_lists_exactly_the_weights_comfyui_builds(path):
    """The golden lists come from ComfyUI's models (tests/support/family_models.py); the specs
    are written from the architectures. Every weight, name and shape, must agree."""
    golden = json.loads(path.read_text())
    spec = families.get(golden["family"])
    table = spec.table(golden["variant"])
    weights = {name: tuple(shape) for name, shape in golden["weights"]}
    assert sorted(set(weights) - set(table))[:3] == [] and sorted(set(table) - set(weights))[:3] == []
    assert {n: s for n, s in table.items() if weights[n] != s} == {}
    # ComfyUI's full parameter count against the published size (within 3%: "12B" is 11.9 B)
    variant = spec.variant(golden["variant"])
    assert golden["parameters"] == pytest.approx(variant.published_parameters, rel=0.03), variant.published


def test_published_layer_counts():
    """The counts users know the models by, from the tables."""
    count = {f"{f}/{v}": len(families.get(f).table(v)) for f, v in (
        ("flux1", "flux1-dev"), ("sdxl", "sdxl-base"), ("qwen_image", "qwen-image"))}
    flux = families.get("flux1").table("flux1-dev")
    assert len([n for n in flux if n.startswith("double_blocks.") and n.endswith(".img_attn.qkv")]) == 19
    assert len([n for n in flux if n.startswith("single_blocks.") and n.endswith(".linear1")]) == 38
    assert count["flux1/flux1-dev"] == 19 * 10 + 38 * 3 + 10  # + embedders and the final layer
    from hypernet import naming

    assert len(naming.sdxl_linear_layers()) == 722  # kohya's default SDXL LoRA
    assert len(naming.transformer_linear_layers("sd15")) == 16 * 10  # + 32 1×1-conv proj_in/out = kohya's 192
    qwen = families.get("qwen_image").table()
    assert len([n for n in qwen if n.endswith(".attn.to_q")]) == 60


# ----------------------------------------------------------------------------- reading

def _probe(width: int, seed: int = 7) -> torch.Tensor:
    """ΔW is compared through its action on a few random inputs: exact for a misplaced row or a
    wrong scale, and never an out×in matrix (Qwen's and Wan's are 12288 × 3072 and larger)."""
    return torch.randn(width, 3, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _apply(up: torch.Tensor, down: torch.Tensor, scale: float, x: torch.Tensor) -> torch.Tensor:
    return up.double().flatten(1) @ (down.double().flatten(1) @ x) * scale


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_every_trainer_layout_reads_to_its_weights(name):
    """Each module lands on its weight — a diffusers `to_q` on the q rows of the fused qkv, zeros in
    the others — with the family and the key layout recognised, nothing left out."""
    layout = LAYOUTS[name]
    sd = state_dict(layout, rank=2, seed=1, alpha=4.0)
    lora = lora_from_state_dict(sd, source=name)
    assert lora.family == layout.family and not lora.unrecognised_keys
    assert lora.key_layouts == {layout.layout: len(sd)}
    assert set(lora.layers) == {canonical for _, _, canonical, _ in layout.modules}
    spec = families.get(layout.family)
    expected: dict[str, torch.Tensor] = {}
    down_suffix, up_suffix, alpha_suffix = layout.suffixes
    for key, (rows, cols), canonical, parts in layout.modules:
        scale = 4.0 / 2 if alpha_suffix else 1.0
        part = _apply(sd[key + up_suffix], sd[key + down_suffix], scale, _probe(cols))
        total = spec.fused_rows(canonical, cols) or rows
        placed = expected.setdefault(canonical, torch.zeros(total, 3, dtype=torch.float64))
        placed[spec.part_rows(canonical, parts, cols) if parts else slice(None)] += part
    for canonical, action in expected.items():
        layer = lora.layers[canonical]
        assert layer.is_low_rank
        got = _apply(layer.up, layer.down, layer.scale, _probe(layer.shape[1]))
        torch.testing.assert_close(got, action, rtol=1e-6, atol=1e-12)


def _flux_fused_and_split(seed: int, rank: int = 3):
    """One Flux LoRA on a double block's qkv and a single block's linear1 as kohya writes it
    (fused), and the same ΔW as diffusers writes it (a LoRA per projection: the fused up's rows,
    the shared down) — two spellings of one update."""
    gen = torch.Generator().manual_seed(seed)
    qkv_up, qkv_down = torch.randn(3 * H, rank, generator=gen) * 0.02, torch.randn(rank, H, generator=gen) / H ** 0.5
    l1_up, l1_down = torch.randn(7 * H, rank, generator=gen) * 0.02, torch.randn(rank, H, generator=gen) / H ** 0.5
    fused = {"lora_unet_double_blocks_3_img_attn_qkv.lora_up.weight": qkv_up,
             "lora_unet_double_blocks_3_img_attn_qkv.lora_down.weight": qkv_down,
             "lora_unet_double_blocks_3_img_attn_qkv.alpha": torch.tensor(float(rank)),
             "lora_unet_single_blocks_7_linear1.lora_up.weight": l1_up,
             "lora_unet_single_blocks_7_linear1.lora_down.weight": l1_down,
             "lora_unet_single_blocks_7_linear1.alpha": torch.tensor(float(rank))}
    split = {}
    for index, proj in enumerate(("to_q", "to_k", "to_v")):
        rows = slice(index * H, (index + 1) * H)
        split[f"transformer.transformer_blocks.3.attn.{proj}.lora_B.weight"] = qkv_up[rows].clone()
        split[f"transformer.transformer_blocks.3.attn.{proj}.lora_A.weight"] = qkv_down.clone()
        split[f"transformer.single_transformer_blocks.7.attn.{proj}.lora_B.weight"] = l1_up[rows].clone()
        split[f"transformer.single_transformer_blocks.7.attn.{proj}.lora_A.weight"] = l1_down.clone()
    split["transformer.single_transformer_blocks.7.proj_mlp.lora_B.weight"] = l1_up[3 * H:].clone()
    split["transformer.single_transformer_blocks.7.proj_mlp.lora_A.weight"] = l1_down.clone()
    return fused, split


def test_a_slice_lora_is_a_block_sparse_lora_of_the_fused_weight():
    fused_sd, split_sd = _flux_fused_and_split(0)
    fused, split = lora_from_state_dict(fused_sd), lora_from_state_dict(split_sd)
    assert set(fused.layers) == set(split.layers) == {"double_blocks.3.img_attn.qkv", "single_blocks.7.linear1"}
    for name in fused.layers:
        a, b = split.layers[name], fused.layers[name]
        torch.testing.assert_close(_apply(a.up, a.down, a.scale, _probe(H)), _apply(b.up, b.down, b.scale, _probe(H)))
        assert split.layers[name].is_low_rank and split.layers[name].rank == 3 * fused.layers[name].rank + (
            3 if name.endswith("linear1") else 0)
    assert any("placed into those rows of the fused weight" in n for n in split.notes)


@pytest.mark.parametrize("method", ["sum", "np-lora"])
def test_fused_and_unfused_files_merge_in_one_space(method):
    """A kohya LoRA on the fused qkv and a diffusers LoRA on to_q/to_k/to_v of the same model
    merge with each other; the result does not depend on which trainer wrote which side."""
    content_fused, content_split = (lora_from_state_dict(sd) for sd in _flux_fused_and_split(1))
    style_fused, style_split = (lora_from_state_dict(sd) for sd in _flux_fused_and_split(2))
    def action(merged, name):
        return _apply(*merged.layer_factors(name), 1.0, _probe(H))

    reference = merge(content_fused, style_fused, None, 0.8, 1.1, method)
    for content, style in ((content_fused, style_split), (content_split, style_fused), (content_split, style_split)):
        merged = merge(content, style, None, 0.8, 1.1, method)
        assert merged.family == "flux1"
        for name in reference.layers:
            torch.testing.assert_close(action(merged, name), action(reference, name), rtol=2e-4, atol=1e-9)
    if method == "sum":
        name = "double_blocks.3.img_attn.qkv"
        c, s = content_fused.layers[name], style_fused.layers[name]
        torch.testing.assert_close(action(reference, name), 0.8 * _apply(c.up, c.down, c.scale, _probe(H))
                                   + 1.1 * _apply(s.up, s.down, s.scale, _probe(H)))


def test_diffusers_save_attn_procs_sdxl_keys_without_unet_prefix():
    """`unet.save_attn_procs()` writes processor keys with no `unet.` prefix (the real SD1.5
    example is tested with the real files); an SDXL file of that form reads to the LDM names."""
    gen = torch.Generator().manual_seed(0)
    sd = {}
    for proj, width_in in (("to_q", 640), ("to_k", 2048), ("to_out", 640)):
        key = f"down_blocks.1.attentions.0.transformer_blocks.1.attn2.processor.{proj}_lora"
        sd[f"{key}.down.weight"] = torch.randn(4, width_in, generator=gen)
        sd[f"{key}.up.weight"] = torch.randn(640, 4, generator=gen)
    lora = lora_from_state_dict(sd)
    assert lora.family == "sdxl" and not lora.unrecognised_keys
    assert set(lora.layers) == {f"input_blocks.4.1.transformer_blocks.1.attn2.{p}" for p in ("to_q", "to_k", "to_out.0")}
    assert lora.key_layouts == {"diffusers attention processors (diffusers <= 0.20)": 6}


def test_the_family_of_a_merge_comes_from_its_inputs():
    """A diffusers file that touches only the attention of the first blocks fits Flux.1 and
    Qwen-Image equally (same names, same widths); merged with a file only Qwen-Image has (block 40),
    both are read as Qwen-Image. Two files of different families are one error naming both."""
    ambiguous = Layout("flux1", "", PEFT, tuple(
        (f"transformer.transformer_blocks.1.attn.{p}", (H, H), "", ()) for p in ("to_q", "to_k", "to_v", "to_out.0")))
    qwen = Layout("qwen_image", "", PEFT, tuple(
        (f"transformer.transformer_blocks.40.attn.{p}", (H, H), "", ()) for p in ("to_q", "to_out.0")))
    content = lora_from_state_dict(state_dict(ambiguous, seed=1), source="ambiguous.safetensors")
    style = lora_from_state_dict(state_dict(qwen, seed=2), source="qwen.safetensors")
    assert content.family_candidates == ("flux1", "qwen_image") and content.family == "flux1"
    assert "double_blocks.1.img_attn.qkv" in content.layers
    assert style.family_candidates == ("qwen_image",)
    merged = merge(content, style, None, method="sum")
    assert merged.family == "qwen_image"
    assert set(merged.layers) == {f"transformer_blocks.{b}.attn.{p}" for b, ps in
                                  ((1, ("to_q", "to_k", "to_v", "to_out.0")), (40, ("to_q", "to_out.0"))) for p in ps}
    assert merge(content, style, None, method="sum").layers.keys() == merged.layers.keys()  # the re-read is kept
    flux = lora_from_state_dict(state_dict(LAYOUTS["flux-kohya"]), source="flux.safetensors")
    with pytest.raises(LoraMismatchError, match=r"content LoRA flux\.safetensors looks like Flux\.1 .* but style LoRA "
                                                r"qwen\.safetensors looks like Qwen-Image .*one base model"):
        merge(flux, style, None, method="sum")
    with pytest.raises(LoraFormatError, match=r"content LoRA flux\.safetensors looks like Flux\.1 .*; expected SDXL"):
        resolve_family(flux, flux, expected="sdxl")


def test_the_hypernetwork_s_family_decides_too():
    from hypernet.model import HypernetConfig, HyperNetwork

    flux = lora_from_state_dict(state_dict(LAYOUTS["flux-kohya"]), source="flux.safetensors")
    with pytest.raises(LoraFormatError, match=r"flux\.safetensors looks like Flux\.1 .*this hypernetwork is for SDXL "
                                              r"\(base family 'sdxl', widths 640/1280\)"):
        merge(flux, flux, HyperNetwork(HypernetConfig()))


# ----------------------------------------------------------------------------- bad input

def test_a_dora_slice_of_a_fused_weight_cannot_be_reconciled():
    sd = state_dict(Layout("flux1", "", PEFT, (("transformer.transformer_blocks.0.attn.to_q", (H, H), "", ()),)))
    sd["transformer.transformer_blocks.0.attn.to_q.lora_magnitude_vector"] = torch.ones(H)
    with pytest.raises(LoraFormatError, match=r"dora\.safetensors: layer double_blocks\.0\.img_attn\.qkv: a DoRA adapter "
                                              r"for a part of a fused weight .*cannot be reconciled"):
        lora_from_state_dict(sd, source="dora.safetensors")


def test_a_slice_of_the_wrong_size_is_one_clear_error():
    gen = torch.Generator().manual_seed(0)
    sd = {"transformer.single_transformer_blocks.0.proj_mlp.lora_A.weight": torch.randn(2, H, generator=gen),
          "transformer.single_transformer_blocks.0.proj_mlp.lora_B.weight": torch.randn(3 * H, 2, generator=gen),
          "transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight": torch.randn(2, H, generator=gen),
          "transformer.single_transformer_blocks.0.attn.to_q.lora_B.weight": torch.randn(H, 2, generator=gen)}
    with pytest.raises(LoraFormatError, match=r"bad\.safetensors: layer single_blocks\.0\.linear1: "
                                              r"transformer\.single_transformer_blocks\.0\.proj_mlp is its mlp_in part, "
                                              r"which at input width 3072 has 12288 rows; the file's factors give 9216"):
        lora_from_state_dict(sd, source="bad.safetensors")


def test_the_same_slice_twice_is_refused():
    sd = state_dict(Layout("flux1", "", PEFT, (("transformer.transformer_blocks.0.attn.to_q", (H, H), "", ()),)))
    sd.update({k.replace("transformer.", "lycoris_").replace(".attn.", "_attn_").replace("blocks.0", "blocks_0")
               .replace(".lora_A.weight", ".lora_down.weight").replace(".lora_B.weight", ".lora_up.weight"): v
               for k, v in sd.items()})
    with pytest.raises(LoraFormatError, match=r"layer double_blocks\.0\.img_attn\.qkv \(q\) appears twice"):
        lora_from_state_dict(sd, source="twice.safetensors")


def test_a_flux_file_asking_for_a_huge_weight_is_refused_with_flux_s_limit():
    sd = {"lora_unet_double_blocks_0_img_attn_qkv.lokr_w1": torch.ones(300, 1),
          "lora_unet_double_blocks_0_img_attn_qkv.lokr_w2": torch.ones(100, 30000),
          "lora_unet_double_blocks_1_img_attn_qkv.lora_up.weight": torch.zeros(3 * H, 1),
          "lora_unet_double_blocks_1_img_attn_qkv.lora_down.weight": torch.zeros(1, H)}
    with pytest.raises(LoraFormatError, match=r"at most 134,217,728 are accepted \(Flux\.1's largest weight has 66,060,288\)"):
        lora_from_state_dict(sd, source="bomb.safetensors")


# ----------------------------------------------------------------------------- real files

REAL = Path(__file__).resolve().parents[2] / "shared" / "real-loras"
REAL_FILES = {
    "weapons": "sd15_object_weapons_diffusers_old_rank4.safetensors",
    "analog": "sd15_style_analog_cloneofsimo_rank4.safetensors",
    "disney": "sd15_style_disney_cloneofsimo_rank1.safetensors",
    "storybook": "sd15_style_storybook_diffusers_rank4.safetensors",
}


def _real(name: str) -> Path:
    path = REAL / REAL_FILES[name]
    if not path.is_file():
        pytest.skip(f"the real SD1.5 LoRAs are not here ({REAL}; see its README): {path.name} missing")
    return path


@pytest.mark.parametrize("name, layers, layout", [
    ("weapons", 128, "diffusers attention processors (diffusers <= 0.20)"),
    ("storybook", 128, "diffusers save_lora_weights"),
    ("analog", 192, "cloneofsimo lora"),
    ("disney", 192, "cloneofsimo lora"),
])
def test_the_real_sd15_files_read_as_sd15(name, layers, layout):
    lora = read_lora(_real(name))
    assert lora.family == "sd15" and len(lora.layers) == layers and set(lora.key_layouts) == {layout}
    assert all(layer.scale == 1.0 for layer in lora.layers.values())
    if layout == "cloneofsimo lora":
        assert len(lora.text_encoder_layers) == 48 and len(lora.unet_layers) == 144
        # position 4 of every transformer block is the GEGLU projection (8× the block's width)
        assert lora.layers["input_blocks.1.1.transformer_blocks.0.ff.net.0.proj"].shape == (2560, 320)
        assert lora.layers["output_blocks.11.1.transformer_blocks.0.attn2.to_k"].shape == (320, 768)
        assert lora.layers["middle_block.1.transformer_blocks.0.attn1.to_q"].shape == (1280, 1280)
        assert (name == "disney") == any("textual-inversion embeddings (<s1>, <s2>)" in n for n in lora.notes)


def test_a_cloneofsimo_file_that_does_not_fit_by_position_is_refused(tmp_path):
    sd = {f"unet:{i}:{r}": torch.zeros((320, 4) if r == "up" else (4, 320)) for i in range(10) for r in ("up", "down")}
    with pytest.raises(LoraFormatError, match=r"odd\.safetensors: a cloneofsimo `lora` file \(keys unet:N:up/down by "
                                              r"position\) whose 10 UNet modules do not fit"):
        read_lora(write_lora(tmp_path / "odd.safetensors", sd))


@pytest.mark.parametrize("method", ["sum", "np-lora", "k-lora", "lorarar"])
def test_real_sd15_files_merge_with_every_method(method, tmp_path):
    """The weapons object LoRA (processor keys without `unet.`) and the cloneofsimo analog style:
    SD1.5 end to end, lorarar with an SD1.5 hypernetwork (random: its widths are SD1.5's)."""
    from hypernet.model import HypernetConfig, HyperNetwork
    from hypernet.writer import merge_metadata, save_merged

    content, style = read_lora(_real("weapons")), read_lora(_real("analog"))
    hypernet = HyperNetwork(HypernetConfig(hidden=16, widths=(320, 640, 1280), base_family="sd15"))
    merged = merge(content, style, hypernet if method == "lorarar" else None, 1.0, 0.7, method)
    assert merged.family == "sd15" and (merged.report.method_layers > 0) == (method != "sum")
    if method == "k-lora":
        assert len(merged.switch_points) == 128  # every attention projection both files have
        return
    path = save_merged(merged, tmp_path / "out.safetensors", merge_metadata(merged))
    back = read_lora(path)
    assert back.family == "sd15" and set(back.layers) == set(merged.layers)
    keys = set(_keys(path))
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight" in keys  # kohya's SD1 prefix
    assert back.metadata["lorarar.family"] == "sd15" and back.metadata["ss_base_model_version"] == "sd_v1"
    name = "input_blocks.4.1.transformer_blocks.0.attn2.to_k"
    torch.testing.assert_close(back.layers[name].delta(), merged.delta(name), rtol=1e-4, atol=1e-8)


def _keys(path: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return list(f.keys())


def test_every_layout_of_the_flux_family_is_flux_by_name_and_proportion_at_any_width():
    """Tiny test models (ComfyUI's tiny Flux has width 64): the proportions, not the published
    widths, tell Flux.1 (linear1 = 7 × width) from Flux.2 (9 ×)."""
    def sd(width, ratio):
        return {"lora_unet_single_blocks_0_linear1.lora_up.weight": torch.zeros(ratio * width, 2),
                "lora_unet_single_blocks_0_linear1.lora_down.weight": torch.zeros(2, width)}

    assert lora_from_state_dict(sd(64, 7)).family == "flux1"
    assert lora_from_state_dict(sd(64, 9)).family == "flux2"
    assert lora_from_state_dict(sd(64, 9)).layers["single_blocks.0.linear1"].shape == (9 * 64, 64)


def test_the_readme_table_lists_every_family():
    """Adding a family is a data file: its row in README's table must not be forgotten."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    table = readme.split("## Model families", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in table.splitlines() if line.startswith("| **")]
    for spec in families.all_families():
        assert any(f"**{spec.name}" in row for row in rows), spec.name
