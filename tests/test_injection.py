"""Differentiable LoRA injection on the SDXL-named test UNet."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hypernet.errors import LoraMismatchError
from hypernet.lora import lora_from_state_dict
from hypernet.model import HypernetConfig, HyperNetwork
from hypernet.training.injection import (
    LoraInjection,
    attention_widths,
    checkpointed_blocks,
    find_module,
    linear_layer_shapes,
)
from hypernet.training.objective import DiscreteSchedule, Sample, ldm_denoiser, ones_coefficients, ziplora_objective
from hypernet.training.testmodel import ToyEncoder, UNetConfig, build_unet, random_lora
from hypernet.training.trainer import CoefficientModel
from tests.support.training import one_thread  # noqa: F401 - fixture

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def setup():
    unet = build_unet(UNetConfig.tiny(), seed=0)
    content = lora_from_state_dict(random_lora(unet, 4, 1), source="content")
    style = lora_from_state_dict(random_lora(unet, 3, 2, family="peft"), source="style")
    encoder = ToyEncoder(unet.config)
    gen = torch.Generator().manual_seed(0)
    latent = encoder.encode_image(torch.rand(1, 64, 64, 3, generator=gen))
    cond = encoder.encode_prompt("a photo of sks dog", tuple(latent.shape))
    return unet, content, style, latent, cond


def run(unet, latent, cond):
    with torch.no_grad():
        return unet(latent, torch.tensor([500.0]), cond["context"], cond["y"])


def test_names_and_widths_of_test_unet():
    unet = build_unet()
    shapes = linear_layer_shapes(unet)
    assert shapes["input_blocks.4.1.transformer_blocks.0.attn1.to_q"] == (32, 32)
    assert shapes["middle_block.1.transformer_blocks.0.attn2.to_k"] == (64, 32)
    assert attention_widths(shapes) == (32, 64)


def test_modes_match_dense_weight_patch(setup):
    """content / style / merged(m=1) equal patching W += ΔW explicitly (dense reference)."""
    unet, content, style, latent, cond = setup
    base_out = run(unet, latent, cond)
    with LoraInjection(unet, content, style) as inj:
        outs = {}
        for mode in ("content", "style"):
            inj.mode = mode
            outs[mode] = run(unet, latent, cond)
        inj.mode, inj.coefficients = "merged", ones_coefficients(inj)
        outs["merged"] = run(unet, latent, cond)
        inj.mode = "off"
        assert torch.equal(run(unet, latent, cond), base_out)
    for mode, loras in (("content", [content]), ("style", [style]), ("merged", [content, style])):
        patched = build_unet(UNetConfig.tiny(), seed=0)
        with torch.no_grad():
            for lora in loras:
                for name, layer in lora.layers.items():
                    find_module(patched, name).weight += layer.delta()
        torch.testing.assert_close(outs[mode], run(patched, latent, cond), rtol=1e-4, atol=1e-5)
        assert not torch.allclose(outs[mode], base_out, atol=1e-3)


def test_attach_detach_leaves_model_bit_identical(setup):
    unet, content, style, latent, cond = setup
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    flags = [p.requires_grad for p in unet.parameters()]
    out_before = run(unet, latent, cond)
    m = {n: (torch.full((w,), 0.5, requires_grad=True), torch.ones(w, requires_grad=True))
         for n, w in LoraInjection(unet, content, style).target_widths().items()}
    with LoraInjection(unet, content, style) as inj:
        inj.mode, inj.coefficients = "merged", m
        unet(latent, torch.tensor([10.0]), cond["context"], cond["y"]).square().mean().backward()
    assert all(torch.equal(v, unet.state_dict()[k]) for k, v in before.items())
    assert [p.requires_grad for p in unet.parameters()] == flags
    assert all(p.grad is None for p in unet.parameters())
    assert not any(module._forward_hooks for module in unet.modules())
    assert torch.equal(run(unet, latent, cond), out_before)


def test_gradients_reach_free_coefficients_and_hypernet(setup):
    unet, content, style, latent, cond = setup
    schedule, denoise = DiscreteSchedule.scaled_linear(), ldm_denoiser(unet)
    sample = Sample(latent, cond, latent.flip(-1), cond)
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(1))
    with LoraInjection(unet, content, style) as inj:
        assert len(inj.target_layers) == 4 * 11 // 11 * 11  # 4 targets × 11 attention modules
        m = {n: (torch.ones(w, requires_grad=True), torch.ones(w, requires_grad=True))
             for n, w in inj.target_widths().items()}
        ziplora_objective(inj, denoise, schedule, sample, m, 300, noise).total.backward()
        for m_c, m_s in m.values():
            assert m_c.grad is not None and m_c.grad.abs().sum() > 0 and m_s.grad.abs().sum() > 0
        hypernet = HyperNetwork(HypernetConfig(hidden=16, widths=(32, 64))).requires_grad_(True)
        model = CoefficientModel(hypernet)
        ziplora_objective(inj, denoise, schedule, sample, model(inj), 300, noise).total.backward()
        for name, p in hypernet.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_hypernet_coefficients_equal_dense_reference(setup):
    unet, content, style, *_ = setup
    hypernet = HyperNetwork(HypernetConfig(hidden=16, widths=(32, 64)))
    with LoraInjection(unet, content, style) as inj:
        coefficients = CoefficientModel(hypernet)(inj)
    name = "output_blocks.3.1.transformer_blocks.0.attn2.to_out.0"
    m_c, m_s = hypernet.coefficients_dense(content.layers[name].delta(), style.layers[name].delta())
    torch.testing.assert_close(coefficients[name][0], m_c, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(coefficients[name][1], m_s, rtol=1e-4, atol=1e-5)


def test_diffusers_named_unet_resolves_canonical_names(setup):
    """The same modules under diffusers paths (down_blocks.1.attentions.0 …) are found."""
    unet, content, *_ = setup
    diffusers = nn.Module()
    diffusers.down_blocks = nn.ModuleList([nn.Module(), nn.Module(), nn.Module()])
    diffusers.down_blocks[1].attentions = nn.ModuleList([unet.input_blocks[4][1], unet.input_blocks[5][1]])
    name = "input_blocks.5.1.transformer_blocks.0.attn1.to_q"
    assert find_module(diffusers, name) is find_module(unet, name)
    assert "input_blocks.5.1.transformer_blocks.0.attn1.to_q" in linear_layer_shapes(diffusers)


def test_lora_for_other_base_is_refused(setup):
    unet, *_ = setup
    other = build_unet(UNetConfig(channels=(16, 48, 64), transformer_depth=(0, 1, 1)))
    lora = lora_from_state_dict(random_lora(other, 2, 0, only="input_blocks.4"), source="wide.safetensors")
    with pytest.raises(LoraMismatchError, match="different base model"):
        LoraInjection(unet, lora, None)


def test_gradient_checkpointing_gives_same_gradients(setup):
    unet, content, style, latent, cond = setup
    grads = []
    for enabled in (False, True):
        m = {n: (torch.ones(w, requires_grad=True), torch.ones(w, requires_grad=True))
             for n, w in LoraInjection(unet, content, style).target_widths().items()}
        with LoraInjection(unet, content, style) as inj, checkpointed_blocks(unet, enabled):
            inj.mode, inj.coefficients = "merged", m
            unet(latent, torch.tensor([10.0]), cond["context"], cond["y"]).square().mean().backward()
        grads.append(torch.cat([g.grad for pair in m.values() for g in pair]))
    torch.testing.assert_close(grads[0], grads[1])
    assert not any("forward" in vars(module) for module in unet.modules())


def test_full_size_sdxl_topology_has_the_722_kohya_layers():
    """The benchmark's `--full-sdxl` model (built on the meta device: no memory) has exactly
    SDXL's 722 LoRA targets, and a synthetic SDXL LoRA attaches with 280 coefficient layers."""
    from hypernet import naming
    from hypernet.tooling import synthetic
    from hypernet.training.testmodel import LdmUNet

    with torch.device("meta"):
        unet = LdmUNet(UNetConfig.sdxl())
    assert linear_layer_shapes(unet) == naming.sdxl_linear_layers()
    assert sum(p.numel() for p in unet.parameters()) == 2_567_463_684  # SDXL's UNet
    lora = lora_from_state_dict(synthetic.sdxl_lora(2, 1, te_layers=0), source="sdxl")
    injection = LoraInjection(unet, lora, lora, device="meta")
    assert len(injection.adapters) == 722 and len(injection.target_layers) == 280


def test_locon_conv_layers_match_dense_patch(setup):
    """LoCon layers (3×3 convs of the ResBlocks, 1×1 skip convs) go through F.conv2d factors."""
    unet, _, _, latent, cond = setup
    gen = torch.Generator().manual_seed(4)
    sd = {}
    for name in ("input_blocks.1.0.in_layers.2", "output_blocks.4.0.skip_connection", "input_blocks.3.0.op"):
        weight = find_module(unet, name).weight
        out, inp, k, _ = weight.shape
        key = "lora_unet_" + name.replace(".", "_")
        sd[f"{key}.lora_down.weight"] = torch.randn(3, inp, k, k, generator=gen) * 0.1
        sd[f"{key}.lora_up.weight"] = torch.randn(out, 3, 1, 1, generator=gen) * 0.1
        sd[f"{key}.alpha"] = torch.tensor(1.5)
    lora = lora_from_state_dict(sd, source="locon")
    assert len(lora.layers) == 3
    with LoraInjection(unet, lora, None) as inj:
        inj.mode = "content"
        injected = run(unet, latent, cond)
    patched = build_unet(UNetConfig.tiny(), seed=0)
    with torch.no_grad():
        for name, layer in lora.layers.items():
            find_module(patched, name).weight += layer.delta()
    torch.testing.assert_close(injected, run(patched, latent, cond), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(injected, run(unet, latent, cond), atol=1e-3)
