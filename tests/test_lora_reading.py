"""Reading: every key layout to one canonical form; adapter kinds; bad input."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from hypernet import lora as lora_mod
from hypernet import naming
from hypernet.errors import LoraFormatError, LoraMismatchError
from hypernet.inspection import describe_lora
from hypernet.lora import read_lora
from hypernet.merge import resolve_family
from hypernet.tooling import synthetic
from tests.support.files import write_lora
from tests.support.loras import loha_lokr_full_dora, sample_lora, sd15_lora, sdxl_every_block_shapes, sdxl_sample_shapes

# Layers read in every key layout: by default one of each of SDXL's 11 transformer blocks'
# names (proj_in/out + the last transformer block, every name the diffusers <-> LDM block mapping
# translates) at real widths; the slow tier reads all 722 UNet targets. Both with two layers of
# each text encoder.
LAYOUTS = {"every-block": sdxl_every_block_shapes(te_layers=2), "full-sdxl": synthetic.sdxl_layer_shapes(te_layers=2)}


@pytest.fixture(scope="module", params=["every-block", pytest.param("full-sdxl", marks=pytest.mark.slow)])
def layout(request):
    """(shapes, ranks, factors); several ranks across layers: 4, 8 and 12 by position."""
    shapes = LAYOUTS[request.param]
    ranks = {name: (4, 8, 12)[i % 3] for i, name in enumerate(shapes)}
    return shapes, ranks, synthetic.random_factors(shapes, ranks, seed=3)


def test_sdxl_layer_inventory():
    layers = naming.sdxl_linear_layers()
    assert len(layers) == 722
    attention = [n for n in layers if n.endswith(("attn1.to_q", "attn2.to_q"))]
    assert len(attention) == 140
    assert layers["input_blocks.7.1.transformer_blocks.3.attn2.to_k"] == (1280, 2048)
    assert layers["output_blocks.5.1.transformer_blocks.1.ff.net.0.proj"] == (5120, 640)


@pytest.mark.parametrize("key_layout", synthetic.KEY_LAYOUTS)
def test_every_key_layout_reads_to_the_same_canonical_form(key_layout, layout, tmp_path):
    shapes, ranks, factors = layout
    path = write_lora(tmp_path / f"{key_layout}.safetensors", synthetic.to_state_dict(factors, key_layout))
    lora = read_lora(path)
    assert not lora.unrecognised_keys
    assert set(lora.layers) == set(shapes)
    unet = 722 if shapes is LAYOUTS["full-sdxl"] else 11 * 2 + 11 * 10
    assert len(lora.unet_layers) == unet and len(lora.text_encoder_layers) == len(shapes) - unet == 2 * 2 * 6
    for name, (up, down) in factors.items():
        layer = lora.layers[name]
        assert layer.kind == "lora" and layer.rank == ranks[name]
        assert torch.equal(layer.up, up) and torch.equal(layer.down, down), name
        assert layer.scale == 1.0  # no alpha key: ΔW = up @ down
    assert lora.family == "sdxl"


def test_alpha_gives_the_effective_scale(layout, tmp_path):
    _, _, factors = layout
    lora = read_lora(write_lora(tmp_path / "a.safetensors", synthetic.to_state_dict(factors, "kohya", alpha=2.0)))
    layer = lora.layers["middle_block.1.transformer_blocks.9.attn1.to_q"]
    assert layer.scale == pytest.approx(2.0 / layer.rank)
    torch.testing.assert_close(layer.delta(), layer.scale * layer.up.float() @ layer.down.float())


def test_metadata_is_kept(sample_lora_pair):
    lora = read_lora(sample_lora_pair[0])
    assert lora.metadata["ss_output_name"] == "subject"


def test_loha_lokr_full_and_dora_are_detected_and_expanded(tmp_path):
    sd = loha_lokr_full_dora()
    lora = lora_mod.lora_from_state_dict(sd)
    base = "input_blocks.4.1.transformer_blocks.0.attn1."
    q, k, v, o = (lora.layers[base + n] for n in ("to_q", "to_k", "to_v", "to_out.0"))
    assert (q.kind, k.kind, v.kind, o.kind, o.is_dora) == ("loha", "lokr", "full", "lora", True)
    p = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_"
    expected_q = (sd[p + "to_q.hada_w1_a"] @ sd[p + "to_q.hada_w1_b"]) * (sd[p + "to_q.hada_w2_a"] @ sd[p + "to_q.hada_w2_b"]) * 0.5
    torch.testing.assert_close(q.delta(), expected_q)
    expected_k = torch.kron(sd[p + "to_k.lokr_w1"], sd[p + "to_k.lokr_w2_a"] @ sd[p + "to_k.lokr_w2_b"]) * 0.5
    torch.testing.assert_close(k.delta(), expected_k)
    assert k.shape == (640, 640)
    torch.testing.assert_close(v.delta(), sd[p + "to_v.diff"])
    info = describe_lora(write_lora(tmp_path / "lyco.safetensors", sd))
    assert info["adapter_kinds"] == {"loha": 1, "lokr": 1, "full": 1, "dora": 1}
    assert any("LoHa" in n for n in info["notes"]) and any("DoRA" in n for n in info["notes"])


@pytest.mark.parametrize(("pair", "layers", "unet_layers", "second_block"), [
    ("sample_lora_pair", len(sdxl_sample_shapes()), 32, "middle_block.1"),
    pytest.param("lora_pair", len(synthetic.sdxl_layer_shapes(te_layers=2)), 722, "input_blocks.5.1",
                 marks=pytest.mark.slow),
])
def test_inspect_reports_blocks_ranks_and_family(pair, layers, unet_layers, second_block, request):
    info = describe_lora(request.getfixturevalue(pair)[0])
    assert info["base_family"] == "sdxl"
    assert info["layers_per_block"]["input_blocks.4.1"] == 2 * (8 + 2) + 2  # 2 blocks × (8 attn + 2 ff) + proj_in/out
    assert list(info["layers_per_block"])[:2] == ["input_blocks.4.1", second_block]
    assert info["ranks"] == {8: layers}
    # every tensor of the file counts, the float32 alphas too
    assert info["dtypes"] == {"float16": 2 * layers, "float32": layers}
    assert info["unet_layers"] == unet_layers


def test_unrecognised_keys_are_counted_not_silently_dropped(tmp_path, caplog):
    sd = sample_lora(rank=2, seed=0)
    sd["lora_unet_some_future_block.lora_up.weight"] = torch.zeros(4, 2)
    sd["totally_unrelated.weight"] = torch.zeros(3)
    path = write_lora(tmp_path / "extra.safetensors", sd)
    lora = read_lora(path)
    assert len(lora.unrecognised_keys) == 2
    assert "2 keys not recognised" in caplog.text
    assert describe_lora(path)["unrecognised_keys"] == 2


# ------------------------------------------------------------------------------- bad input

def test_not_a_safetensors_file(tmp_path):
    path = tmp_path / "random.safetensors"
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!" + b"x" * 100)
    with pytest.raises(LoraFormatError, match=r"random\.safetensors: corrupt safetensors header"):
        read_lora(path)
    path.write_bytes(b"abc")
    with pytest.raises(LoraFormatError, match="not a safetensors file"):
        read_lora(path)


def test_truncated_file(sample_lora_pair, tmp_path):
    data = sample_lora_pair[0].read_bytes()
    path = tmp_path / "cut.safetensors"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(LoraFormatError, match=r"cut\.safetensors: truncated or corrupt"):
        read_lora(path)
    path.write_bytes(data[:20])
    with pytest.raises(LoraFormatError, match="cut.safetensors"):
        read_lora(path)


@pytest.mark.parametrize("name", ["lora.ckpt", "lora.pt", "disguised.safetensors"])
def test_pickles_are_refused_never_unpickled(tmp_path, name):
    path = tmp_path / name
    marker = tmp_path / "was_unpickled"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    torch.save({"x": Evil()}, path)
    with pytest.raises(LoraFormatError, match="pickle"):
        read_lora(path)
    assert not marker.exists()


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_or_inf_weights(tmp_path, bad):
    sd = sample_lora(rank=2, seed=0)
    key = next(k for k in sd if k.endswith("lora_up.weight"))
    sd[key][0, 0] = bad
    with pytest.raises(LoraFormatError, match="NaN or Inf"):
        read_lora(write_lora(tmp_path / "nan.safetensors", sd))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64],
                         ids=["fp16", "bf16", "fp32", "fp64"])
def test_the_finite_check_finds_every_non_finite_value_and_only_those(dtype):
    """all_finite sums instead of masking; a sum that overflows must not count as a bad value."""
    clean = torch.randn(300, 7).to(dtype)
    assert lora_mod.all_finite(clean) and lora_mod.all_finite(torch.empty(0, 4, dtype=dtype))
    for values in ([float("nan")], [float("inf")], [float("-inf")], [float("inf"), float("-inf")]):
        bad = clean.clone()
        bad.view(-1)[[17 * (i + 1) for i in range(len(values))]] = torch.tensor(values, dtype=dtype)
        assert not lora_mod.all_finite(bad), (dtype, values)
    # finite values whose float32 sum overflows (and, for fp64, values beyond float32's range)
    big = torch.finfo(dtype).max if dtype != torch.float64 else 1e300
    assert lora_mod.all_finite(torch.full((64,), big, dtype=dtype))
    assert lora_mod.all_finite(torch.tensor([big, -big, big], dtype=dtype))


def test_an_sd15_lora_is_read_as_sd15_and_refused_where_sdxl_is_expected():
    lora = lora_mod.lora_from_state_dict(sd15_lora(), source="sd15.safetensors")
    assert lora.family == "sd15" and lora.family_candidates == ("sd15",)
    assert lora.layers["te1.text_model.encoder.layers.0.self_attn.q_proj"].shape == (768, 768)  # `lora_te_`
    sdxl = lora_mod.lora_from_state_dict(sample_lora(rank=2, seed=1), source="sdxl.safetensors")
    with pytest.raises(LoraFormatError, match=r"style LoRA sd15\.safetensors looks like SD1\.5 \(.*\); expected SDXL"):
        resolve_family(sdxl, lora, expected="sdxl")
    with pytest.raises(LoraMismatchError, match=r"content LoRA sdxl\.safetensors looks like SDXL .* but style LoRA "
                                                r"sd15\.safetensors looks like SD1\.5 .*one base model"):
        resolve_family(sdxl, lora)


def test_a_flux_lora_is_read_as_flux():
    sd = {"lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": torch.zeros(9216, 4),
          "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.zeros(4, 3072)}
    lora = lora_mod.lora_from_state_dict(sd, source="flux.safetensors")
    assert lora.family == "flux1" and set(lora.layers) == {"double_blocks.0.img_attn.qkv"}


def test_keys_of_no_known_family_are_one_clear_error():
    sd = {"model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(4, 64),
          "model.layers.0.self_attn.q_proj.lora_B.weight": torch.zeros(64, 4)}
    with pytest.raises(LoraFormatError, match=r"llm\.safetensors: no LoRA layers found \(2 keys.*reads LoRAs of SDXL"):
        lora_mod.lora_from_state_dict(sd, source="llm.safetensors")


def test_broken_factor_shapes(tmp_path):
    sd = {"lora_unet_middle_block_1_proj_in.lora_up.weight": torch.zeros(1280, 8),
          "lora_unet_middle_block_1_proj_in.lora_down.weight": torch.zeros(4, 1280)}
    with pytest.raises(LoraFormatError, match="do not chain"):
        lora_mod.lora_from_state_dict(sd, source="x")


def test_header_length_starting_with_byte_0x80_is_not_mistaken_for_a_pickle(tmp_path):
    """A header of 128 + 256·k bytes makes the file start with 0x80, like a pickle."""
    sd = synthetic.to_state_dict(synthetic.random_factors({"middle_block.1.proj_in": (1280, 1280)}, 2, 0))
    for pad in range(400):
        path = tmp_path / f"len{pad}.safetensors"
        save_file(sd, str(path), {"pad": "x" * pad})
        if path.read_bytes()[0] == 0x80:
            break
        path.unlink()
    else:
        pytest.fail("could not produce a header length whose first byte is 0x80")
    assert set(read_lora(path).layers) == {"middle_block.1.proj_in"}
