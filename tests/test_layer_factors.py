"""MergedLora.layer_factors: the one-patch-per-weight factors the merge node hands ComfyUI."""

from __future__ import annotations

import pytest
import torch

from hypernet.lora import lora_from_state_dict
from hypernet.merge import merge
from hypernet.model import HypernetConfig, HyperNetwork
from hypernet.tooling import synthetic

SHAPES = {"input_blocks.4.1.transformer_blocks.0.attn1.to_q": (640, 640),
          "input_blocks.4.1.transformer_blocks.0.ff.net.2": (640, 2560),
          "middle_block.1.transformer_blocks.0.attn2.to_out.0": (1280, 1280)}


def test_factors_multiply_to_the_merged_delta_at_any_strengths():
    torch.manual_seed(0)
    content = lora_from_state_dict(synthetic.to_state_dict(synthetic.random_factors(SHAPES, 4, 0), alpha=2.0))
    style = lora_from_state_dict(synthetic.to_state_dict(synthetic.random_factors(SHAPES, 8, 1, dtype=torch.float16)))
    merged = merge(content, style, HyperNetwork(HypernetConfig(hidden=16)), 0.7, 1.3)
    assert merged.coefficients  # column coefficients are folded in, not only strengths
    for strengths in ((0.7, 1.3), (1.0, 0.0), (-0.5, 2.0)):
        view = merged.with_strengths(*strengths)
        for name in SHAPES:
            up, down = view.layer_factors(name)
            assert up.shape[1] == down.shape[0] == (12 if strengths[1] and strengths[0] else 4 if strengths[0] else 8)
            torch.testing.assert_close(up @ down, view.delta(name).flatten(1), rtol=1e-5, atol=1e-6)
    assert merged.with_strengths(0.0, 0.0).layer_factors(next(iter(SHAPES))) is None


def test_scheduled_and_dense_layers_have_no_factors():
    from hypernet.merged import MergedLayer, MergedLora, MergeReport, Side

    dense_layer = lora_from_state_dict({
        "lora_unet_middle_block_1_transformer_blocks_0_attn1_to_q.diff": torch.randn(1280, 1280)}).layers
    name = "middle_block.1.transformer_blocks.0.attn1.to_q"
    merged = MergedLora({name: MergedLayer(content=Side.of(dense_layer[name]))}, MergeReport("sum"))
    assert merged.layer_factors(name) is None
    low = lora_from_state_dict(synthetic.to_state_dict(synthetic.random_factors({name: (1280, 1280)}, 2, 0))).layers[name]
    scheduled = MergedLora({name: MergedLayer(content=Side.of(low), style=Side.of(low))}, MergeReport("k-lora"),
                           switch_points={name: 0.5})
    assert scheduled.layer_factors(name) is None


def _pair_merge():
    torch.manual_seed(0)
    content = lora_from_state_dict(synthetic.to_state_dict(synthetic.random_factors(SHAPES, 4, 0), alpha=2.0))
    style = lora_from_state_dict(synthetic.to_state_dict(synthetic.random_factors(SHAPES, 8, 1, dtype=torch.float16)))
    return merge(content, style, HyperNetwork(HypernetConfig(hidden=16)), 0.7, 1.3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_add_merged_delta_computes_in_float32_and_rounds_once(dtype):
    """What the one-patch-per-weight adapter does: whatever precision ComfyUI works in (its
    low-VRAM path passes fp16/bf16 weights), the result is base + ΔW in float32 rounded once."""
    from hypernet.merged import add_merged_delta

    merged = _pair_merge()
    name = "middle_block.1.transformer_blocks.0.attn2.to_out.0"
    base = (torch.randn(1280, 1280, generator=torch.Generator().manual_seed(5)) * 0.05).to(dtype)
    expected = (base.float() + 0.5 * merged.delta(name).float()).to(dtype)
    result = add_merged_delta(base.clone(), merged.layer_patch(name), strength=0.5)
    assert result.dtype == dtype
    if dtype == torch.float32:
        torch.testing.assert_close(result, expected, rtol=1e-5, atol=1e-6)
    else:  # one rounding of the same float32 sum: at most one unit in the last place apart
        ulp = (expected.float().abs() * (2.0 ** -10 if dtype == torch.float16 else 2.0 ** -7)).clamp_min(1e-7)
        assert ((result.float() - expected.float()).abs() <= ulp).all()
        # what fp16/bf16 arithmetic would give (ΔW rounded, then added) is measurably worse
        naive = base + (0.5 * merged.delta(name)).to(dtype)
        assert (naive.float() - (base.float() + 0.5 * merged.delta(name))).abs().mean() >= \
            (result.float() - (base.float() + 0.5 * merged.delta(name))).abs().mean()


def test_add_merged_delta_applies_a_patch_function_to_delta_only():
    from hypernet.merged import add_merged_delta

    merged = _pair_merge()
    name = "input_blocks.4.1.transformer_blocks.0.attn1.to_q"
    base = torch.randn(640, 640)
    doubled = add_merged_delta(base.clone(), merged.layer_patch(name), 1.0, function=lambda d: d * 2)
    torch.testing.assert_close(doubled, base + 2 * merged.delta(name), rtol=1e-5, atol=1e-6)
    identity = add_merged_delta(base.clone(), merged.layer_patch(name), 1.0, function=lambda d: d)
    torch.testing.assert_close(identity, base + merged.delta(name), rtol=1e-5, atol=1e-6)
    assert add_merged_delta(base, merged.layer_patch(name), 0.0) is base


def test_prepared_sides_give_each_sides_delta_including_dense_sides():
    from hypernet.merged import MergedLayer, MergedLora, MergeReport, PreparedSides, Side

    name = "middle_block.1.transformer_blocks.0.attn1.to_q"
    low = lora_from_state_dict(synthetic.to_state_dict(synthetic.random_factors({name: (1280, 1280)}, 4, 0),
                                                       alpha=2.0)).layers[name]
    dense = lora_from_state_dict({f"lora_unet_{name.replace('.', '_')}.diff": torch.randn(1280, 1280)}).layers[name]
    merged = MergedLora({name: MergedLayer(content=Side.of(low), style=Side.of(dense))}, MergeReport("k-lora"),
                        content_strength=0.8, style_strength=1.5, switch_points={name: 0.5})
    layer = merged.layers[name]
    for role, side, p in (("content", layer.content, 0.0), ("style", layer.style, 0.9)):
        prepared = PreparedSides.of([(side, merged.strength(role))])
        torch.testing.assert_close(prepared.delta(), merged.delta_at(name, p), rtol=1e-5, atol=1e-6)
    assert PreparedSides.of([(layer.content, 0.0)]).delta() is None
