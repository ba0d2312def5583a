"""A LoRA written for pieces of a fused weight (diffusers' to_q/to_k/to_v of Flux's
`img_attn.qkv`, and proj_mlp of `single_blocks.N.linear1`) is held as its pieces
(hypernet/row_blocks.py), never as the zero-padded up of the fused weight: what a read layer
holds, that it is exactly the block-sparse LoRA of the fused weight built with its zeros, that
merges with fused (kohya) and sliced files equal the dense formulas, and that the written merge
and ComfyUI's patch give the same ΔW."""

from __future__ import annotations

import math

import pytest
import torch

from hypernet import families
from hypernet.errors import LoraFormatError
from hypernet.lora import lora_from_state_dict, read_lora
from hypernet.merge import merge
from hypernet.merged import add_merged_delta
from hypernet.row_blocks import (
    RowBlocks,
    Stacked,
    add_product,
    cross,
    dense,
    of_pieces,
    packed,
    rows_of,
    times,
    unpacked,
)
from hypernet.writer import save_merged
from tests.support.files import write_lora
from tests.support.tensors import tensors_in

H = 64  # a tiny Flux's width (ComfyUI's test model's): the parts' rows scale with it

QKV, LINEAR1 = "double_blocks.3.img_attn.qkv", "single_blocks.7.linear1"
# (diffusers module, part of the fused weight, rank): ranks differ, so the pieces' columns do too
PIECES = {
    QKV: [("transformer_blocks.3.attn.to_q", "q", 2), ("transformer_blocks.3.attn.to_k", "k", 3),
          ("transformer_blocks.3.attn.to_v", "v", 4)],
    LINEAR1: [("single_transformer_blocks.7.attn.to_q", "q", 2), ("single_transformer_blocks.7.attn.to_k", "k", 3),
              ("single_transformer_blocks.7.attn.to_v", "v", 1), ("single_transformer_blocks.7.proj_mlp", "mlp_in", 5)],
}
KOHYA = {QKV: "lora_unet_double_blocks_3_img_attn_qkv", LINEAR1: "lora_unet_single_blocks_7_linear1"}
SPEC = families.get("flux1")


def sliced(seed: int, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """A diffusers-form Flux LoRA: one LoRA per projection (no alpha: scale 1)."""
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for name, pieces in PIECES.items():
        for module, part, rank in pieces:
            rows = len(SPEC.part_rows(name, [part], H))
            sd[f"transformer.{module}.lora_B.weight"] = (torch.randn(rows, rank, generator=gen) * 0.02).to(dtype)
            sd[f"transformer.{module}.lora_A.weight"] = (torch.randn(rank, H, generator=gen) / H ** 0.5).to(dtype)
    return sd


def fused(seed: int, rank: int = 6) -> dict[str, torch.Tensor]:
    """A kohya-form Flux LoRA of the same weights (alpha 3: scale 1/2)."""
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for name, key in KOHYA.items():
        sd[f"{key}.lora_up.weight"] = torch.randn(SPEC.fused_rows(name, H), rank, generator=gen) * 0.02
        sd[f"{key}.lora_down.weight"] = torch.randn(rank, H, generator=gen) / H ** 0.5
        sd[f"{key}.alpha"] = torch.tensor(3.0)
    return sd


def padded(sd: dict, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(up, down) of a sliced file's weight built the explicit way, zeros and all, in float64."""
    pieces = PIECES[name]
    up = torch.zeros(SPEC.fused_rows(name, H), sum(rank for _, _, rank in pieces), dtype=torch.float64)
    column = 0
    for module, part, rank in pieces:
        up[SPEC.part_rows(name, [part], H), column:column + rank] = sd[f"transformer.{module}.lora_B.weight"].double()
        column += rank
    down = torch.cat([sd[f"transformer.{module}.lora_A.weight"].double() for module, _, _ in pieces])
    return up, down


def dense_delta(sd: dict, name: str) -> torch.Tensor:
    """ΔW of either form of file, float64, from its own tensors."""
    if f"{KOHYA[name]}.lora_up.weight" in sd:
        up, down = sd[f"{KOHYA[name]}.lora_up.weight"].double(), sd[f"{KOHYA[name]}.lora_down.weight"].double()
        return float(sd[f"{KOHYA[name]}.alpha"]) / down.shape[0] * up @ down
    up, down = padded(sd, name)
    return up @ down


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float((got.double() - expected).abs().max() / expected.abs().max())


# ----------------------------------------------------------------------------- reading

def test_a_sliced_file_is_held_as_its_own_tensors(tmp_path):
    sd = sliced(1, torch.bfloat16)
    lora = read_lora(write_lora(tmp_path / "sliced.safetensors", sd))
    held = [t for layer in lora.layers.values() for t in layer.held_tensors()]
    assert sum(t.nbytes for t in held) == sum(t.nbytes for t in sd.values())  # no padding, no stacked copy
    assert all(t.dtype == torch.bfloat16 for t in held)
    for name in PIECES:
        layer = lora.layers[name]
        assert isinstance(layer.up_factor, RowBlocks) and isinstance(layer.down_factor, Stacked)
        assert layer.rank == sum(rank for _, _, rank in PIECES[name]) and layer.scale == 1.0
        up, down = padded(sd, name)
        assert layer.shape == (SPEC.fused_rows(name, H), H)
        assert torch.equal(dense(layer.up_factor), layer.up) and layer.up.shape == up.shape
        # the pieces stand side by side in the file's order: the products agree, column order aside
        torch.testing.assert_close(layer.up.double() @ layer.down.double(), up @ down, rtol=1e-12, atol=0)
        torch.testing.assert_close(layer.delta().double(), up @ down, rtol=1e-5, atol=1e-9)


def test_the_pieces_are_the_state_dict_s_tensors_not_copies():
    sd = sliced(2)
    layer = lora_from_state_dict(sd).layers[LINEAR1]
    pointers = {t.data_ptr() for t in sd.values()}
    assert {t.data_ptr() for t in layer.held_tensors()} <= pointers


def test_pieces_with_different_scales_carry_them_in_their_ups():
    """Alphas that differ per piece go into each piece's up (float32); alpha = the rank."""
    sd = sliced(3)
    for (module, _, _), alpha in zip(PIECES[QKV], (1.0, 6.0, 2.0)):
        sd[f"transformer.{module}.alpha"] = torch.tensor(alpha)
    layer = lora_from_state_dict(sd).layers[QKV]
    assert isinstance(layer.up_factor, RowBlocks) and layer.up_factor.dtype == torch.float32
    assert layer.scale == 1.0
    up, down = padded(sd, QKV)
    scales = torch.cat([torch.full((rank,), alpha / rank, dtype=torch.float64)
                        for (_, _, rank), alpha in zip(PIECES[QKV], (1.0, 6.0, 2.0))])
    torch.testing.assert_close(layer.delta().double(), (up * scales) @ down, rtol=1e-5, atol=1e-9)


# ----------------------------------------------------------------------------- the algebra

def _blocks() -> tuple[RowBlocks, torch.Tensor]:
    """Pieces that overlap (a LoRA of the whole weight beside parts of it) and a piece whose rows
    run out of order (SD3's (scale, shift) part of a (shift, scale) modulation), with their dense up."""
    gen = torch.Generator().manual_seed(4)
    total = 12
    rows_of_pieces = [list(range(total)), list(range(2, 5)), list(range(8, 12)) + list(range(5, 8))]
    ups = [torch.randn(len(rows), rank, generator=gen, dtype=torch.float64)
           for rows, rank in zip(rows_of_pieces, (2, 3, 1))]
    blocks = of_pieces(ups, rows_of_pieces, total)
    expected = torch.zeros(total, 6, dtype=torch.float64)
    column = 0
    for up, rows in zip(ups, rows_of_pieces):
        expected[rows, column:column + up.shape[1]] = up
        column += up.shape[1]
    return blocks, expected


def test_the_block_algebra_equals_the_dense_up():
    blocks, up = _blocks()
    gen = torch.Generator().manual_seed(5)
    assert blocks.shape == (12, 6) and len(blocks.blocks) == 4  # the out-of-order piece is two runs
    assert torch.equal(dense(blocks), up)
    x = torch.randn(6, 7, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(times(blocks, x), up @ x)
    other = torch.randn(12, 5, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(cross(blocks, other, torch.float64), up.T @ other)
    torch.testing.assert_close(cross(other, blocks, torch.float64), other.T @ up)
    torch.testing.assert_close(cross(blocks, blocks, torch.float64), up.T @ up)
    out = torch.randn(12, 7, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(add_product(out.clone(), blocks, x, 0.5), out + 0.5 * up @ x)
    torch.testing.assert_close(rows_of(blocks, 3, 9, torch.float64), up[3:9])
    torch.testing.assert_close(rows_of(blocks, 10, None, torch.float64), up[10:])


def _copy_tensors(value):
    """What a container that walks tuples does to them (ComfyUI's dynamic-VRAM prefetch): every
    tensor copied elsewhere, everything else passed through as it is."""
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, (tuple, list)):
        return type(value)(_copy_tensors(v) for v in value)
    return value


def test_a_packed_factor_is_moved_whole_by_a_copy_that_walks_tuples():
    blocks, up = _blocks()
    down = Stacked((torch.randn(2, 7, dtype=torch.float64), torch.randn(4, 7, dtype=torch.float64)))
    for factor, expected in ((blocks, up), (down, torch.cat(down.pieces)), (up, up)):
        moved = _copy_tensors(packed(factor))
        originals = {t.untyped_storage().data_ptr() for t in tensors_in(packed(factor))}
        assert tensors_in(moved) and not {t.untyped_storage().data_ptr() for t in tensors_in(moved)} & originals
        assert torch.equal(dense(unpacked(moved)), expected)
    assert packed(up) is up and unpacked(up) is up
    with pytest.raises(TypeError):
        packed("up")
    with pytest.raises(TypeError):
        unpacked(("something else", ()))


# ----------------------------------------------------------------------------- merging

PAIRS = {"sliced x fused": (sliced, fused), "fused x sliced": (fused, sliced), "sliced x sliced": (sliced, sliced)}


def np_reference(dc: torch.Tensor, ds: torch.Tensor, k: int, mu: float, side: str) -> torch.Tensor:
    """ΔW_c·(I − c·V_k V_kᵀ) (input side) or (I − c·U_k U_kᵀ)·ΔW_c, from the SVD of the dense ΔW_s."""
    c = mu / (1 + mu)
    u, _, vh = torch.linalg.svd(ds, full_matrices=False)
    if side == "input":
        v = vh[:k].T
        return dc - c * (dc @ v) @ v.T
    u = u[:, :k]
    return dc - c * u @ (u.T @ dc)


@pytest.mark.parametrize("pair", PAIRS)
@pytest.mark.parametrize("method", ["sum", "np-lora input", "np-lora output"])
def test_merges_equal_the_dense_formulas(pair, method):
    make_content, make_style = PAIRS[pair]
    content_sd, style_sd = make_content(10), make_style(11)
    content, style = lora_from_state_dict(content_sd), lora_from_state_dict(style_sd)
    name, _, side = method.partition(" ")
    params = {"side": side, "mu": 2.0} if side else None
    merged = merge(content, style, None, 0.8, 1.1, name, params=params)
    for layer in PIECES:
        dc, ds = dense_delta(content_sd, layer), dense_delta(style_sd, layer)
        if side:
            dc = np_reference(dc, ds, style.layers[layer].rank, 2.0, side)
        expected = 0.8 * dc + 1.1 * ds
        assert relative_error(merged.delta(layer), expected) < 2e-5, layer
        # ComfyUI's one patch per weight adds the same ΔW
        patched = add_merged_delta(torch.zeros(expected.shape), merged.layer_patch(layer))
        assert relative_error(patched, expected) < 2e-5, layer
        assert merged.layers[layer].rank == content.layers[layer].rank + style.layers[layer].rank


def test_np_lora_keeps_the_style_side_and_the_content_up_as_pieces():
    content, style = lora_from_state_dict(sliced(12)), lora_from_state_dict(sliced(13))
    merged = merge(content, style, None, method="np-lora")
    for name in PIECES:
        layer = merged.layers[name]
        assert layer.content.up is content.layers[name].up_factor
        assert layer.style.up is style.layers[name].up_factor and layer.style.down is style.layers[name].down_factor
        assert isinstance(layer.content.down, torch.Tensor) and layer.content.down.shape == (content.layers[name].rank, H)


def test_k_lora_of_sliced_files_equals_that_of_the_same_update_fused():
    """A sliced file and a kohya file of the same ΔW switch at the same p, with the same update."""
    def as_fused(sd):
        out = {}
        for name, key in KOHYA.items():
            up, down = padded(sd, name)
            out.update({f"{key}.lora_up.weight": up.float(), f"{key}.lora_down.weight": down.float()})
        return out

    content_sd, style_sd = sliced(14), sliced(15)
    a = merge(lora_from_state_dict(content_sd), lora_from_state_dict(style_sd), None, method="k-lora")
    b = merge(lora_from_state_dict(as_fused(content_sd)), lora_from_state_dict(as_fused(style_sd)), None,
              method="k-lora")
    assert a.switch_points.keys() == b.switch_points.keys() and a.switch_rows == b.switch_rows
    for name, point in b.switch_points.items():
        assert a.switch_points[name] == pytest.approx(point, rel=1e-5)
        for p in (0.0, 0.999):
            torch.testing.assert_close(a.delta_at(name, p), b.delta_at(name, p), rtol=1e-5, atol=1e-9)


def test_the_written_merge_reads_back_to_the_same_update(tmp_path):
    content, style = lora_from_state_dict(sliced(16)), lora_from_state_dict(fused(17))
    merged = merge(content, style, None, 0.7, 1.2, "np-lora")
    again = read_lora(save_merged(merged, tmp_path / "merged.safetensors"))
    assert set(again.layers) == set(PIECES) and again.family == "flux1"
    for name in PIECES:
        assert again.layers[name].rank == content.layers[name].rank + style.layers[name].rank
        expected = merged.delta(name).double()
        assert relative_error(again.layers[name].delta(), expected) < 1e-6, name
    assert math.isclose(float(again.layers[LINEAR1].alpha), again.layers[LINEAR1].rank)


def test_a_lora_of_the_whole_weight_beside_its_parts_adds_up():
    """One file with a kohya LoRA of the fused qkv and diffusers LoRAs of its parts: overlapping
    pieces (different scales, carried in their ups), which merge like their dense sum."""
    whole = {k: v for k, v in fused(18).items() if k.startswith(KOHYA[QKV])}
    content_sd, style_sd = {**sliced(19), **whole}, sliced(20)
    content, style = lora_from_state_dict(content_sd), lora_from_state_dict(style_sd)
    layer = content.layers[QKV]
    assert isinstance(layer.up_factor, RowBlocks) and layer.rank == 9 + 6
    up, down = padded(content_sd, QKV)
    dc = up @ down + dense_delta(whole, QKV)
    assert relative_error(layer.delta(), dc) < 1e-6
    merged = merge(content, style, None, method="np-lora", params={"mu": 1.0})
    ds = dense_delta(style_sd, QKV)
    assert relative_error(merged.delta(QKV), np_reference(dc, ds, style.layers[QKV].rank, 1.0, "input") + ds) < 2e-5


def test_a_nan_in_one_piece_is_found():
    sd = sliced(21)
    sd["transformer.single_transformer_blocks.7.proj_mlp.lora_B.weight"][3, 1] = float("nan")
    with pytest.raises(LoraFormatError, match=r"1 layer\(s\) contain NaN or Inf values \(first: single_blocks\.7\.linear1\)"):
        lora_from_state_dict(sd, source="nan.safetensors")
