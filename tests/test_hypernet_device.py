"""The hypernetwork's device setting (issue 12): named, checked, and the same coefficients."""

from __future__ import annotations

import pytest
import torch

from hypernet.cli import main
from hypernet.errors import LoraRarError
from hypernet.lora import lora_from_state_dict
from hypernet.merge import merge
from hypernet.methods import lorarar
from hypernet.model import HypernetConfig, HyperNetwork
from hypernet.tooling import synthetic
from tests.support.files import write_lora

SHAPES = {f"input_blocks.4.1.transformer_blocks.0.attn{a}.{p}": (640, 640) for a in (1, 2) for p in ("to_q", "to_out.0")}
SHAPES.update({f"middle_block.1.transformer_blocks.{i}.attn1.to_q": (1280, 1280) for i in range(5)})


@pytest.fixture(scope="module")
def pair():
    content = lora_from_state_dict(synthetic.to_state_dict(synthetic.random_factors(SHAPES, 4, 0), alpha=2.0))
    style = lora_from_state_dict(synthetic.to_state_dict(synthetic.random_factors(SHAPES, 8, 1)))
    torch.manual_seed(3)
    return content, style, HyperNetwork(HypernetConfig(hidden=16)).eval()


def test_a_device_this_machine_lacks_is_one_clear_error(pair):
    content, style, hypernet = pair
    missing = "cuda:7" if not torch.cuda.is_available() else "cuda:999"
    with pytest.raises(LoraRarError, match=r"lorarar: device must be a torch device this machine has.*cuda"):
        merge(content, style, hypernet, method="lorarar", params={"device": missing})
    with pytest.raises(LoraRarError, match="lorarar: device"):
        merge(content, style, hypernet, method="lorarar", params={"device": "no-such-device"})


def test_one_call_per_group_equals_the_cpu_pass(pair):
    """What an accelerator runs (each group of equal shapes in one batched call of H) gives the
    coefficients of the CPU's buffered pass."""
    content, style, hypernet = pair
    on_cpu, _ = lorarar.compute_coefficients(content, style, hypernet, device="cpu")
    assert set(on_cpu) == set(SHAPES)
    for width in (640, 1280):
        names = [n for n in SHAPES if SHAPES[n][0] == width]
        with torch.no_grad():
            m_c, m_s = lorarar.accelerator_group_coefficients(
                hypernet, [content.layers[n] for n in names], [style.layers[n] for n in names], torch.device("cpu"))
        for i, name in enumerate(names):
            torch.testing.assert_close(m_c[i], on_cpu[name][0], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(m_s[i], on_cpu[name][1], rtol=1e-5, atol=1e-6)
            assert on_cpu[name][0].device.type == "cpu"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_cuda_coefficients_equal_the_cpu_ones(pair):
    content, style, hypernet = pair
    on_cpu, _ = lorarar.compute_coefficients(content, style, hypernet, device="cpu")
    on_gpu, _ = lorarar.compute_coefficients(content, style, hypernet, device="cuda")
    assert next(hypernet.parameters()).device.type == "cpu"  # the caller's H was not moved
    for name in on_cpu:
        for i in (0, 1):
            assert on_gpu[name][i].device.type == "cpu"
            rel = (on_gpu[name][i] - on_cpu[name][i]).abs().max() / on_cpu[name][i].abs().max()
            assert rel <= 1e-4, (name, float(rel))


def test_cli_h_device_belongs_to_lorarar(tmp_path, capsys):
    content = write_lora(tmp_path / "c.safetensors", synthetic.to_state_dict(synthetic.random_factors(SHAPES, 4, 0)))
    style = write_lora(tmp_path / "s.safetensors", synthetic.to_state_dict(synthetic.random_factors(SHAPES, 4, 1)))
    out = tmp_path / "o.safetensors"
    assert main(["merge", str(content), str(style), "-o", str(out), "--method", "sum", "--h-device", "cpu"]) == 1
    assert "--h-device is a setting of --method lorarar" in capsys.readouterr().err
    assert not out.exists()
