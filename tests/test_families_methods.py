"""The merge methods on the families beyond SDXL, on small models with the families' module names
(the published widths are in tests/test_families.py): what each method touches is the family's
data (K-LoRA's switch set, LoRA.rar's targets), the written file is in keys ComfyUI maps, the CLI
takes the family, and text-encoder layers need a CLIP."""

from __future__ import annotations

import json

import pytest
import torch

from hypernet import families
from hypernet.cli import main as cli_main
from hypernet.errors import HypernetError, LoraRarError
from hypernet.lora import lora_from_state_dict, read_lora
from hypernet.merge import merge
from hypernet.model import HypernetConfig, HyperNetwork
from hypernet.writer import merge_metadata, save_merged
from tests.support.files import write_lora

W = 16  # the small Flux's width: qkv 3W, linear1 7W (q, k, v, 4W MLP), linear2 reads 5W


def small_flux(seed: int, rank: int = 2, scale: float = 1.0) -> dict[str, torch.Tensor]:
    """A kohya Flux.1 LoRA (sd-scripts' keys) on a Flux of width 16 with 2 double and 2 single blocks."""
    gen = torch.Generator().manual_seed(seed)
    shapes = {}
    for i in range(2):
        for stream in ("img", "txt"):
            shapes[f"double_blocks_{i}_{stream}_attn_qkv"] = (3 * W, W)
            shapes[f"double_blocks_{i}_{stream}_attn_proj"] = (W, W)
            shapes[f"double_blocks_{i}_{stream}_mlp_0"] = (4 * W, W)
            shapes[f"double_blocks_{i}_{stream}_mlp_2"] = (W, 4 * W)
        shapes[f"single_blocks_{i}_linear1"] = (7 * W, W)
        shapes[f"single_blocks_{i}_linear2"] = (W, 5 * W)
    sd = {}
    for module, (out, inp) in shapes.items():
        sd[f"lora_unet_{module}.lora_up.weight"] = torch.randn(out, rank, generator=gen) * 0.1 * scale
        sd[f"lora_unet_{module}.lora_down.weight"] = torch.randn(rank, inp, generator=gen)
        sd[f"lora_unet_{module}.alpha"] = torch.tensor(float(rank))
    return sd


@pytest.fixture(scope="module")
def flux_pair():
    content = small_flux(1)
    for key in [k for k in content if "single_blocks_1" in k and k.endswith("lora_up.weight")]:
        content[key] = content[key] * 2  # a stronger content layer: it switches later than the others
    return lora_from_state_dict(content, source="content"), lora_from_state_dict(small_flux(2), source="style")


def test_k_lora_switches_what_the_flux_data_lists(flux_pair):
    """Double blocks: the image stream's qkv and proj; single blocks: linear1's q/k/v rows only —
    before the switch its MLP rows are the sum and its q/k/v rows the content, after it the style."""
    content, style = flux_pair
    assert content.family == "flux1"
    merged = merge(content, style, None, method="k-lora", params={"top_k": 8})
    assert set(merged.switch_points) == {f"double_blocks.{i}.img_attn.{p}" for i in range(2) for p in ("qkv", "proj")} \
        | {f"single_blocks.{i}.linear1" for i in range(2)}
    assert merged.switch_rows == {f"single_blocks.{i}.linear1": (0, 3 * W) for i in range(2)}
    assert "switch" in families.get("flux1").k_lora_why
    name = "single_blocks.1.linear1"
    c, s = content.layers[name].delta(), style.layers[name].delta()
    point = merged.switch_points[name]
    assert 0 < point < 1, point
    before, after = merged.delta_at(name, point / 2), merged.delta_at(name, (1 + point) / 2)
    torch.testing.assert_close(before[:3 * W], c[:3 * W])
    torch.testing.assert_close(after[:3 * W], s[:3 * W])
    torch.testing.assert_close(before[3 * W:], c[3 * W:] + s[3 * W:])
    torch.testing.assert_close(after[3 * W:], c[3 * W:] + s[3 * W:])
    # the magnitudes that set the point are those of the q/k/v rows only
    from hypernet.methods.k_lora import magnitude

    layer = merged.layers[name]
    assert magnitude(layer.content, 8, rows=(0, 3 * W)).total == pytest.approx(float(c[:3 * W].abs().sum()), rel=1e-5)


def test_the_k_lora_node_plan_keeps_the_other_rows_static(flux_pair):
    """What reaches ComfyUI: a switching patch of linear1's q/k/v rows, and its MLP rows in the
    static plan as the sum (both patches together are exactly delta_at at every p)."""
    from hypernet.nodelogic.merge import switch_plan

    merged = merge(*flux_pair, None, method="k-lora", params={"top_k": 8})
    plan = switch_plan(merged)
    key = "lora_unet_single_blocks_1_linear1"
    assert key in plan.points
    static = sum(sd[f"{key}.lora_up.weight"].float() @ sd[f"{key}.lora_down.weight"].float()
                 * (sd[f"{key}.alpha"] / sd[f"{key}.lora_down.weight"].shape[0]) * strength
                 for sd, strength in plan.static if f"{key}.lora_up.weight" in sd)
    assert torch.count_nonzero(static[:3 * W]) == 0
    torch.testing.assert_close(static[3 * W:], merged.delta_at("single_blocks.1.linear1", 0.0)[3 * W:])


def test_lorarar_on_flux_needs_a_flux_hypernetwork(flux_pair):
    content, style = flux_pair
    with pytest.raises(LoraRarError, match=r"looks like Flux\.1 .*this hypernetwork is for SDXL"):
        merge(content, style, HyperNetwork(HypernetConfig()))
    # H's targets (to_q, to_out.0) are roles: on Flux the weights holding q or the attention output —
    # both streams' qkv and proj, the single blocks' linear1 (q, k, v, MLP in) and linear2
    hypernet = HyperNetwork(HypernetConfig(hidden=8, widths=(W, 3 * W), base_family="flux"))
    with pytest.raises(HypernetError, match=r"are 112 wide; this hypernetwork supports widths 16/48"):
        merge(content, style, hypernet)
    merged = merge(content, style, hypernet, unsupported_width="sum")
    assert set(merged.coefficients) == {f"double_blocks.{i}.{s}_attn.{p}" for i in range(2) for s in ("img", "txt")
                                        for p in ("qkv", "proj")} | {f"single_blocks.{i}.linear2" for i in range(2)}
    assert merged.report.width_fallback_layers == 2 and merged.family == "flux1"
    name = "double_blocks.0.img_attn.qkv"
    m_c, m_s = merged.coefficients[name]
    expected = content.layers[name].delta() * m_c + style.layers[name].delta() * m_s
    torch.testing.assert_close(merged.delta(name), expected, rtol=1e-5, atol=1e-7)


def test_a_merged_flux_file_is_written_in_keys_comfyui_maps(flux_pair, tmp_path):
    merged = merge(*flux_pair, None, 1.0, 0.5, method="np-lora")
    path = save_merged(merged, tmp_path / "flux.safetensors", merge_metadata(merged))
    back = read_lora(path)
    assert back.family == "flux1" and back.key_layouts == {"kohya": 3 * len(merged.layers)}
    assert back.metadata["lorarar.family"] == "flux1" and back.metadata["ss_base_model_version"] == "flux1"
    assert back.metadata["modelspec.architecture"] == "flux-1-dev/lora"
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        assert "lora_unet_single_blocks_0_linear1.lora_up.weight" in f.keys()
    for name in merged.layers:
        torch.testing.assert_close(back.layers[name].delta(), merged.delta(name), rtol=1e-5, atol=1e-7)


def test_the_cli_merges_flux_and_takes_the_family(tmp_path, capsys):
    content = write_lora(tmp_path / "c.safetensors", small_flux(1))
    style = write_lora(tmp_path / "s.safetensors", small_flux(2))
    assert cli_main(["merge", str(content), str(style), "-o", str(tmp_path / "m.safetensors"), "--method", "sum"]) == 0
    assert read_lora(tmp_path / "m.safetensors").family == "flux1"
    assert cli_main(["merge", str(content), str(style), "-o", str(tmp_path / "k.json"), "--method", "k-lora",
                     "--k-top-k", "8"]) == 0
    schedule = json.loads((tmp_path / "k.json").read_text())
    assert schedule["family"] == "flux1"
    assert schedule["switch_rows"] == {f"lora_unet_single_blocks_{i}_linear1": [0, 3 * W] for i in range(2)}
    capsys.readouterr()
    assert cli_main(["merge", str(content), str(style), "-o", str(tmp_path / "x.safetensors"), "--family", "sdxl"]) == 1
    assert "no LoRA layers found" in capsys.readouterr().err


def _merge_patches():
    from tests.support.comfy_pack import pack_module

    return pack_module("nodes.merge_patches", v3=False)


def test_text_encoder_layers_without_a_clip():
    """Only text-encoder layers and no CLIP: one error; some: the model part is applied and the node
    says which layers were not."""
    te = {"lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.ones(768, 1) * 0.01,
          "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.ones(1, 768)}
    only_text = lora_from_state_dict({**te, **{k.replace("layers_0", "layers_1"): v for k, v in te.items()}}, source="te")
    merged = merge(only_text, only_text, None, method="sum", expected_family="sdxl")
    patches = _merge_patches()
    with pytest.raises(Exception, match=r"^clip: the two LoRAs have only text-encoder layers \(2, e\.g\. te1\.") as info:
        patches._text_encoders_without_clip(merged, object(), None)
    assert type(info.value).__name__ == "LoraRarError"  # the pack's own copy of the library's type
    from tests.support.loras import sample_lora

    both = lora_from_state_dict({**sample_lora(rank=2, seed=1), **te}, source="both")
    merged = merge(both, both, None, method="sum")
    patches._text_encoders_without_clip(merged, object(), None)
    assert any("text-encoder layer(s) of the LoRAs were NOT applied: no CLIP connected" in a for a in merged.report.alerts)
