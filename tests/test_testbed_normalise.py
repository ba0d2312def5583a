"""H reading normalised columns (issue 18, DESIGN §12): the RMS of a factored ΔW without forming it,
coefficients that no longer depend on a LoRA's overall magnitude, every merge path agreeing with
the dense definition, the option stored in the hypernetwork's metadata by the trainer."""

from __future__ import annotations

import pytest
import torch

from hypernet.model import HypernetConfig, HyperNetwork, factored_rms, load_hypernet, save_hypernet


def _h(normalise: str, seed: int = 0) -> HyperNetwork:
    torch.manual_seed(seed)
    h = HyperNetwork(HypernetConfig(hidden=8, widths=(16,), extra={"input_normalisation": normalise}))
    return h.eval()


def _factors(seed: int, out: int = 16, inp: int = 12, rank: int = 3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(out, rank, generator=g) * 0.01, torch.randn(rank, inp, generator=g)


def test_factored_rms_is_the_rms_of_the_product():
    up, down = _factors(0)
    assert torch.allclose(factored_rms(up, down).squeeze(), (up @ down).pow(2).mean().sqrt(), rtol=1e-5)
    ups, downs = torch.stack([up, 3 * up]), torch.stack([down, down])
    rms = factored_rms(ups, downs)
    assert rms.shape == (2, 1, 1) and torch.allclose(rms[1] / rms[0], torch.tensor(3.0), rtol=1e-5)


def test_normalised_h_ignores_each_sides_magnitude_and_raw_h_does_not():
    (up_c, down_c), (up_s, down_s) = _factors(1), _factors(2)
    norm, raw = _h("layer_rms"), _h("none")
    with torch.no_grad():
        for h, same in ((norm, True), (raw, False)):
            a = h.coefficients_factored(up_c, down_c, up_s, down_s)
            b = h.coefficients_factored(40 * up_c, down_c, 0.2 * up_s, down_s)
            assert all(torch.allclose(x, y, atol=1e-5) for x, y in zip(a, b)) == same
            dense = h.coefficients_dense(up_c @ down_c, up_s @ down_s)
            assert all(torch.allclose(x, y, atol=1e-5) for x, y in zip(a, dense))


def test_unknown_normalisation_is_refused_where_it_is_read():
    from hypernet.errors import HypernetError

    up, down = _factors(3)
    with pytest.raises(HypernetError, match="input normalisation 'whiten'"), torch.no_grad():
        _h("whiten").coefficients_factored(up, down, up, down)


def test_merge_applies_the_normalisation_of_the_file(tmp_path):
    """`merge(method="lorarar")` on the CPU (its buffered pass serves only raw-column H) gives the
    coefficients of the dense definition on normalised columns; saved and loaded, H keeps the option."""
    from safetensors.torch import save_file

    from hypernet.lora import read_lora
    from hypernet.merge import merge
    from hypernet.tooling.synthetic import random_factors, to_state_dict

    block = "input_blocks.4.1.transformer_blocks.0"
    shapes = {f"{block}.{a}.{p}": (16, 16) for a in ("attn1", "attn2") for p in ("to_q", "to_k", "to_out.0")}
    loras = []
    for seed, rank in ((1, 3), (2, 5)):
        save_file(to_state_dict(random_factors(shapes, rank, seed), alpha=rank), str(tmp_path / f"{seed}.safetensors"))
        loras.append(read_lora(tmp_path / f"{seed}.safetensors"))
    content, style = loras
    path = save_hypernet(_h("layer_rms"), tmp_path / "h.safetensors")
    h = load_hypernet(path)
    assert h.input_normalisation == "layer_rms"
    merged = merge(content, style, h, method="lorarar")
    assert merged.coefficients
    for name, (m_c, m_s) in merged.coefficients.items():
        c, s = content.layers[name], style.layers[name]
        with torch.no_grad():
            want_c, want_s = h.coefficients_dense(c.delta().flatten(1).float(), s.delta().flatten(1).float())
        assert torch.allclose(m_c, want_c, atol=1e-5) and torch.allclose(m_s, want_s, atol=1e-5), name


def test_trainer_option_lands_in_the_metadata():
    from hypernet.errors import TrainingError
    from hypernet.training.trainer import TrainSettings, build_hypernet

    h = build_hypernet((16,), TrainSettings(hidden=4, input_normalisation="layer_rms"), "test")
    assert h.config.extra["input_normalisation"] == "layer_rms" and h.input_normalisation == "layer_rms"
    assert build_hypernet((16,), TrainSettings(hidden=4), "test").input_normalisation == "none"
    with pytest.raises(TrainingError, match="input_normalisation"):
        build_hypernet((16,), TrainSettings(hidden=4, input_normalisation="whiten"), "test")
