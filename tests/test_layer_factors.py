"""MergedLora.layer_factors: the one-patch-per-weight factors the merge node hands ComfyUI."""

from __future__ import annotations

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
