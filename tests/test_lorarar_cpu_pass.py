"""The CPU coefficient pass (hypernet/methods/lorarar_cpu.py) against LoRA.rar written out densely.

The pass reuses buffers across chunks of layers and blocks of activations, so the cases here
cross those boundaries (chunk and block sizes are shrunk to make that cheap), mix ranks, scales
and file dtypes, and use a non-square layer so that rows and columns cannot be confused.
"""

from __future__ import annotations

import pytest
import torch

from hypernet.lora import LOW_RANK, LoraLayer
from hypernet.methods import lorarar_cpu
from hypernet.model import HypernetConfig, HyperNetwork

OUT, IN = 24, 40  # H's width is the layer's output size; one coefficient pair per input column


def _layers(count: int, rank: int, dtype: torch.dtype, seed: int) -> list[LoraLayer]:
    gen = torch.Generator().manual_seed(seed)
    layers = []
    for i in range(count):
        up = (torch.randn(OUT, rank, generator=gen) * 0.3).to(dtype)
        down = torch.randn(rank, IN, generator=gen).to(dtype)
        alpha = None if i % 3 == 0 else float(rank) * (0.5 + 0.25 * i)  # scale 1 and others
        layers.append(LoraLayer(LOW_RANK, {"up": up, "down": down}, alpha=alpha))
    return layers


def _dense_reference(hypernet: HyperNetwork, content: LoraLayer, style: LoraLayer) -> torch.Tensor:
    """(2, IN) in float64: every column of [ΔW_c; ΔW_s] through H's two layers."""
    with torch.no_grad():
        return _dense(hypernet, content, style)


def _dense(hypernet: HyperNetwork, content: LoraLayer, style: LoraLayer) -> torch.Tensor:
    delta_c = content.scale * content.up.double() @ content.down.double()
    delta_s = style.scale * style.up.double() @ style.down.double()
    first, head = hypernet.input_layer(OUT), hypernet.output[1]
    columns = torch.cat([delta_c, delta_s]).T
    hidden = torch.relu(columns @ first.weight.double().T + first.bias.double())
    return (hidden @ head.weight.double().T + head.bias.double()).T


@pytest.fixture(scope="module")
def hypernet():
    torch.manual_seed(5)
    return HyperNetwork(HypernetConfig(hidden=12, widths=(OUT,))).eval()


@pytest.mark.parametrize("count", [1, 3, 7, 12])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=["fp16", "bf16", "fp32"])
def test_every_layer_equals_the_dense_formulation(hypernet, monkeypatch, count, dtype):
    monkeypatch.setattr(lorarar_cpu, "CHUNK", 5)
    monkeypatch.setattr(lorarar_cpu, "BLOCK", 2)
    contents, styles = _layers(count, 3, dtype, seed=count), _layers(count, 8, dtype, seed=100 + count)
    done = []
    with torch.no_grad():
        result = lorarar_cpu.group_coefficients(hypernet, contents, styles, progress=done.append)
    assert result.shape == (count, 2, IN) and result.dtype == torch.float32
    assert sum(done) == count and max(done) <= 5
    for i in range(count):
        expected = _dense_reference(hypernet, contents[i], styles[i])
        worst = float((result[i].double() - expected).abs().max() / expected.abs().max())
        assert worst < 1e-5, (i, worst)


def test_chunk_and_block_sizes_do_not_change_the_result(hypernet, monkeypatch):
    contents, styles = _layers(11, 4, torch.float16, seed=1), _layers(11, 4, torch.float16, seed=2)
    with torch.no_grad():
        whole = lorarar_cpu.group_coefficients(hypernet, contents, styles)
        for chunk, block in ((1, 1), (4, 3), (11, 11)):
            monkeypatch.setattr(lorarar_cpu, "CHUNK", chunk)
            monkeypatch.setattr(lorarar_cpu, "BLOCK", block)
            torch.testing.assert_close(lorarar_cpu.group_coefficients(hypernet, contents, styles), whole,
                                       rtol=1e-6, atol=1e-7)


def test_the_copy_fallback_without_foreach_gives_the_same_result(hypernet, monkeypatch):
    """torch builds without `_foreach_copy_` copy one factor at a time."""
    contents, styles = _layers(6, 2, torch.float16, seed=3), _layers(6, 5, torch.float16, seed=4)
    with torch.no_grad():
        fast = lorarar_cpu.group_coefficients(hypernet, contents, styles)
        monkeypatch.setattr(lorarar_cpu, "_foreach_copy", None)
        assert torch.equal(lorarar_cpu.group_coefficients(hypernet, contents, styles), fast)
