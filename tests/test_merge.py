"""Merge: the library against an independent dense implementation of the method and the strength convention (docs/methods.md)."""

from __future__ import annotations

import json
import re

import pytest
import torch

from hypernet import naming
from hypernet.errors import HypernetError, LoraFormatError, LoraMismatchError
from hypernet.lora import lora_from_state_dict, read_lora
from hypernet.merge import merge
from hypernet.model import HypernetConfig, HyperNetwork, load_hypernet
from hypernet.tooling import synthetic
from hypernet.writer import merge_metadata, save_merged
from tests.support.loras import loha_lokr_full_dora, sample_lora

TARGET = re.compile(r"\.attn[12]\.(to_q|to_out\.0)$")


class ReferenceMerge:
    """The method and the strength convention written out densely (float64) from the raw kohya tensors and the raw
    official state dict — shares no code with the library. Layers are computed one at a time:
    a whole dense SDXL LoRA would need ~17 GB."""

    def __init__(self, content_sd, style_sd, hypernet_sd, cs=1.0, ss=1.0):
        self.content_sd, self.style_sd, self.hypernet_sd, self.cs, self.ss = content_sd, style_sd, hypernet_sd, cs, ss
        modules = lambda sd: {k[: -len(".lora_up.weight")] for k in sd if k.endswith(".lora_up.weight")}  # noqa: E731
        self.modules = modules(content_sd) | modules(style_sd)

    @staticmethod
    def _delta(sd, module):
        if module + ".lora_up.weight" not in sd:
            return None
        up, down = sd[module + ".lora_up.weight"].double(), sd[module + ".lora_down.weight"].double()
        alpha = sd.get(module + ".alpha")
        scale = float(alpha) / down.shape[0] if alpha is not None else 1.0
        return scale * up @ down

    def _coefficients(self, dc, ds):
        x = torch.cat([dc, ds], dim=0).T  # one row per input column, content first
        sd = self.hypernet_sd
        name = next(k[:-7] for k, v in sd.items() if k.startswith("input_") and k.endswith(".weight") and v.shape[1] == x.shape[1])
        h = torch.relu(x @ sd[name + ".weight"].double().T + sd[name + ".bias"].double())
        m = h @ sd["output.1.weight"].double().T + sd["output.1.bias"].double()
        return m[:, 0], m[:, 1]

    def delta(self, module):
        dc, ds = self._delta(self.content_sd, module), self._delta(self.style_sd, module)
        if dc is None or ds is None:
            return self.cs * dc if dc is not None else self.ss * ds
        if module.startswith("lora_unet_") and re.search(r"_attn[12]_(to_q|to_out_0)$", module):
            m_c, m_s = self._coefficients(dc, ds)
            return self.cs * dc * m_c + self.ss * ds * m_s
        return self.cs * dc + self.ss * ds


# The two layers that only one LoRA has (both are in the sample too).
CONTENT_ONLY = "input_blocks.4.1.proj_in"
STYLE_ONLY = "input_blocks.4.1.transformer_blocks.1.attn1.to_q"


@pytest.fixture(scope="module", params=["sample", pytest.param("full-sdxl", marks=pytest.mark.slow)])
def pair_sd(request):
    """Content rank 4 with alpha 2, style rank 8 without alpha; one layer only in each. The
    default tier uses a sample of SDXL's layers at real widths (tests/support/loras.py: a whole
    640-wide block, 1280-wide middle-block layers, text encoders) and checks every layer of it;
    the slow tier repeats every test on all 722 targets."""
    if request.param == "sample":
        content, style = sample_lora(rank=4, seed=11, alpha=2), sample_lora(rank=8, seed=12)
    else:
        content = synthetic.sdxl_lora(rank=4, seed=11, alpha=2, te_layers=1)
        style = synthetic.sdxl_lora(rank=8, seed=12, te_layers=1)
    for key in [k for k in content if naming.ldm_to_kohya_key(STYLE_ONLY) + "." in k]:
        del content[key]
    for key in [k for k in style if naming.ldm_to_kohya_key(CONTENT_ONLY) + "." in k]:
        del style[key]
    return content, style


def is_full_size(pair_sd) -> bool:
    return len(pair_sd[0]) > 1000


def step(pair_sd, full_size_step: int) -> int:
    """Dense checks run on every layer of the sample; at full size on every n-th layer (a whole
    dense SDXL LoRA is ~17 GB and minutes of float64 products)."""
    return full_size_step if is_full_size(pair_sd) else 1


def _check_against_reference(merged, reference, tol=2e-6, every=1):
    """Compare every `every`-th layer (and all hypernetwork layers of the 640-wide blocks)."""
    from hypernet import naming

    assert {naming.ldm_to_kohya_key(n) for n in merged.layers} == reference.modules
    worst, checked = 0.0, 0
    for index, (name, layer) in enumerate(merged.layers.items()):
        if index % every and not (name in merged.coefficients and layer.content.up.shape[0] == 640):
            continue
        expected = reference.delta(naming.ldm_to_kohya_key(name))
        got = merged.delta(name).double()
        worst = max(worst, float((got - expected).abs().max() / expected.abs().max().clamp_min(1e-12)))
        checked += 1
    assert worst < tol, worst
    return checked


@pytest.mark.parametrize("use_official", [False, True], ids=["random-hypernet", "official-sdxl"])
def test_merge_equals_dense_reference(pair_sd, random_hypernet_pth, use_official, request):
    path = request.getfixturevalue("official_sdxl_path") if use_official else random_hypernet_pth
    raw = torch.load(path, weights_only=True, map_location="cpu")
    content_sd, style_sd = pair_sd
    content, style = lora_from_state_dict(content_sd, source="c"), lora_from_state_dict(style_sd, source="s")
    merged = merge(content, style, load_hypernet(path), content_strength=0.8, style_strength=1.3)
    checked = _check_against_reference(merged, ReferenceMerge(content_sd, style_sd, raw, 0.8, 1.3),
                                       every=step(pair_sd, 15))
    assert checked > 80 if is_full_size(pair_sd) else checked == len(merged.layers)
    # H on to_q and to_out.0 of every attention module (280 of them in SDXL), except the one
    # layer that only the style has
    targets = [n for n in merged.layers if TARGET.search(n) and not naming.is_text_encoder(n)]
    assert len(targets) == (280 if is_full_size(pair_sd) else 2 * 2 * 3)
    report = merged.report
    assert report.method_layers == len(targets) - 1 and report.content_only_layers == 1 and report.style_only_layers == 1
    assert report.summed_layers == len(merged.layers) - len(targets) - 1 and report.dense_layers == 0
    # exact low rank: r_c + r_s where both exist
    both = merged.layers["middle_block.1.transformer_blocks.0.attn2.to_q"]
    assert both.rank == 12 and both.is_low_rank
    assert merged.layers[CONTENT_ONLY].rank == 4


def test_factored_equals_dense_coefficients(pair_sd, random_hypernet_pth):
    hypernet = load_hypernet(random_hypernet_pth)
    content, style = (lora_from_state_dict(sd) for sd in pair_sd)
    merged = merge(content, style, hypernet)
    for name in ("input_blocks.4.1.transformer_blocks.0.attn1.to_q", "middle_block.1.transformer_blocks.0.attn2.to_out.0"):
        m_c, m_s = hypernet.coefficients_dense(content.layers[name].delta(), style.layers[name].delta())
        torch.testing.assert_close(merged.coefficients[name][0], m_c, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(merged.coefficients[name][1], m_s, atol=1e-5, rtol=1e-5)


def test_strengths_scale_linearly_and_never_change_coefficients(pair_sd, random_hypernet_pth):
    hypernet = load_hypernet(random_hypernet_pth)
    content, style = (lora_from_state_dict(sd) for sd in pair_sd)
    base = merge(content, style, hypernet)
    c_only = merge(content, style, hypernet, 1.0, 0.0)
    s_only = merge(content, style, hypernet, 0.0, 1.0)
    scaled = merge(content, style, hypernet, 2.5, -0.5)
    for name in base.coefficients:
        assert torch.equal(base.coefficients[name][0], scaled.coefficients[name][0])
    for name in ("middle_block.1.transformer_blocks.0.attn1.to_out.0", "input_blocks.4.1.proj_out",
                 "te2.text_model.encoder.layers.0.self_attn.q_proj"):
        expected = 2.5 * c_only.delta(name) - 0.5 * s_only.delta(name)
        torch.testing.assert_close(scaled.delta(name), expected, atol=1e-7, rtol=1e-5)
        torch.testing.assert_close(base.delta(name), c_only.delta(name) + s_only.delta(name), atol=1e-7, rtol=1e-5)


def test_sum_with_weights_one_and_minus_one_cancels(pair_sd):
    content = lora_from_state_dict(pair_sd[0])
    merged = merge(content, content, method="sum", content_strength=1.0, style_strength=-1.0)
    assert merged.report.summed_layers == len(content.layers) and not merged.coefficients
    for name in list(merged.layers)[::step(pair_sd, 3)]:
        assert merged.delta(name).abs().max() < 1e-9, name


def test_sum_equals_reference_sum(pair_sd):
    content_sd, style_sd = pair_sd
    merged = merge(lora_from_state_dict(content_sd), lora_from_state_dict(style_sd), method="sum",
                   content_strength=0.7, style_strength=1.1)
    # A hypernetwork that outputs exactly 1 and 1 turns the reference into the plain sum.
    ones = {"input_1.weight": torch.zeros(1, 1280), "input_1.bias": torch.zeros(1),
            "input_2.weight": torch.zeros(1, 2560), "input_2.bias": torch.zeros(1),
            "output.1.weight": torch.zeros(2, 1), "output.1.bias": torch.ones(2)}
    _check_against_reference(merged, ReferenceMerge(content_sd, style_sd, ones, 0.7, 1.1), every=step(pair_sd, 25))


def test_saved_file_rereads_to_the_same_delta(pair_sd, random_hypernet_pth, tmp_path):
    hypernet = load_hypernet(random_hypernet_pth)
    content, style = (lora_from_state_dict(sd) for sd in pair_sd)
    merged = merge(content, style, hypernet, 1.2, 0.9)
    meta = merge_metadata(merged, hypernet_name="random", content_sha256="c" * 64, style_sha256="s" * 64)
    path = save_merged(merged, tmp_path / "merged.safetensors", meta)
    again = read_lora(path)
    assert set(again.layers) == set(merged.layers)
    assert not again.unrecognised_keys
    kohya = merged.to_state_dict()
    for name in merged.layers:  # fp32 factors are written bit for bit
        key = naming.ldm_to_kohya_key(name)
        assert torch.equal(again.layers[name].up, kohya[f"{key}.lora_up.weight"])
        assert torch.equal(again.layers[name].down, kohya[f"{key}.lora_down.weight"])
        assert again.layers[name].scale == 1.0
    for name in list(merged.layers)[::step(pair_sd, 50)]:
        torch.testing.assert_close(again.layers[name].delta(), merged.delta(name), atol=1e-8, rtol=1e-5)
    assert again.metadata["lorarar.method"] == "lorarar"
    assert again.metadata["ss_network_dim"] == "12" and again.metadata["lorarar.content_sha256"] == "c" * 64
    # ranks differ (4 and 8 where only one LoRA has the layer): the most common one is claimed,
    # every other layer's rank is recorded
    assert json.loads(again.metadata["lorarar.rank_counts"]) == {"4": 1, "8": 1, "12": len(merged.layers) - 2}
    assert json.loads(again.metadata["lorarar.other_ranks"]) == {
        naming.ldm_to_kohya_key(STYLE_ONLY): 8, naming.ldm_to_kohya_key(CONTENT_ONLY): 4}
    assert again.metadata["lorarar.content_strength"] == "1.2"
    # kohya names only
    from safetensors import safe_open
    with safe_open(str(path), "pt") as f:
        keys = list(f.keys())
    assert all(k.startswith(("lora_unet_", "lora_te1_", "lora_te2_")) for k in keys)
    # fp16 output is close, not exact
    half = read_lora(save_merged(merged, tmp_path / "half.safetensors", meta, dtype="fp16"))
    name = "middle_block.1.transformer_blocks.0.attn1.to_q"
    assert half.layers[name].up.dtype == torch.float16
    torch.testing.assert_close(half.layers[name].delta(), merged.delta(name), atol=1e-5, rtol=2e-2)


def test_writing_refuses_to_overwrite_and_leaves_nothing_behind(tmp_path):
    small = synthetic.to_state_dict(synthetic.random_factors(synthetic.text_encoder_layers(1), 4, 0))
    merged = merge(lora_from_state_dict(small), lora_from_state_dict(small), method="sum")
    target = tmp_path / "out.safetensors"
    target.write_bytes(b"precious")
    from hypernet.errors import OutputExistsError
    with pytest.raises(OutputExistsError, match="already exists"):
        save_merged(merged, target)
    assert target.read_bytes() == b"precious"
    save_merged(merged, target, force=True)
    assert read_lora(target).layers
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.safetensors"]


def test_layer_with_different_shapes_in_the_two_loras():
    shapes = {"middle_block.1.transformer_blocks.0.attn1.to_q": (1280, 1280)}
    other = {"middle_block.1.transformer_blocks.0.attn1.to_q": (640, 640)}
    c = lora_from_state_dict(synthetic.to_state_dict(synthetic.random_factors(shapes, 4, 0)), source="subject.safetensors")
    s = lora_from_state_dict(synthetic.to_state_dict(synthetic.random_factors(other, 4, 0)), source="style.safetensors")
    for method in ("lorarar", "sum"):
        with pytest.raises(LoraMismatchError, match=r"shape \(1280, 1280\) in the content LoRA \(subject\.safetensors\) but \(640, 640\) in the style LoRA"):
            merge(c, s, HyperNetwork(HypernetConfig()), method=method)


def test_width_without_an_input_layer_errors_or_falls_back():
    shapes = {"input_blocks.1.1.transformer_blocks.0.attn1.to_q": (320, 320),
              "input_blocks.4.1.transformer_blocks.0.attn1.to_q": (640, 640)}
    c = lora_from_state_dict(synthetic.to_state_dict(synthetic.random_factors(shapes, 4, 0)))
    s = lora_from_state_dict(synthetic.to_state_dict(synthetic.random_factors(shapes, 4, 1)))
    assert c.family == s.family == "sd15"
    with pytest.raises(LoraFormatError, match=r"looks like SD1\.5 .*this hypernetwork is for SDXL"):
        merge(c, s, HyperNetwork(HypernetConfig()))  # the official checkpoint's family
    hypernet = HyperNetwork(HypernetConfig(base_family="sd15"))  # an SD1.5 H that lacks the 320 width
    with pytest.raises(HypernetError, match="320 wide; this hypernetwork supports widths 640/1280"):
        merge(c, s, hypernet)
    merged = merge(c, s, hypernet, unsupported_width="sum")
    assert merged.report.width_fallback_layers == 1 and merged.report.method_layers == 1
    name = "input_blocks.1.1.transformer_blocks.0.attn1.to_q"
    torch.testing.assert_close(merged.delta(name), c.layers[name].delta() + s.layers[name].delta())


def test_lycoris_adapters_are_written_as_exact_loras(random_hypernet_pth, tmp_path):
    """LoHa, LoKr and DoRA sides merged with plain LoRAs: every layer is written as an exact LoRA
    (LoHa and LoKr through their Khatri-Rao / Kronecker factors), only the full difference stays a
    `.diff`; the file is no bigger than its factors and reads back to the merge."""
    lyco = lora_from_state_dict(loha_lokr_full_dora())
    shapes = {f"input_blocks.4.1.transformer_blocks.0.attn1.{p}": (640, 640) for p in ("to_q", "to_k", "to_v", "to_out.0")}
    plain = lora_from_state_dict(synthetic.to_state_dict(synthetic.random_factors(shapes, 4, 5), alpha=4))
    hypernet = load_hypernet(random_hypernet_pth)
    with pytest.raises(LoraFormatError, match=r"1 layer\(s\) are DoRA .*--dora drop-magnitude"):
        merge(lyco, plain, hypernet)
    merged = merge(lyco, plain, hypernet, dora="drop-magnitude")
    assert merged.report.dense_layers == 3 and merged.report.method_layers == 2
    assert merged.report.dora_magnitude_dropped == 1 and any("WITHOUT their magnitude" in n for n in merged.report.notes)
    q = "input_blocks.4.1.transformer_blocks.0.attn1.to_q"
    m_c, m_s = hypernet.coefficients_dense(lyco.layers[q].delta(), plain.layers[q].delta())
    torch.testing.assert_close(merged.delta(q), lyco.layers[q].delta() * m_c + plain.layers[q].delta() * m_s)
    path = save_merged(merged, tmp_path / "exact.safetensors")
    again = read_lora(path)
    kinds = {name.split("attn1.")[1]: layer.kind for name, layer in again.layers.items()}
    assert kinds == {"to_q": "lora", "to_k": "lora", "to_v": "full", "to_out.0": "lora"}
    assert again.layers[q].rank == 4 * 4 + 4  # the LoHa side at rank 4·4, the LoRA at 4
    for name in shapes:
        torch.testing.assert_close(again.layers[name].delta(), merged.delta(name), rtol=1e-4, atol=1e-6)
    assert path.stat().st_size < 3 * 640 * 640 * 4  # one dense difference (to_v) and small factors


def test_conv_locon_layers_concatenate(tmp_path):
    g = torch.Generator().manual_seed(0)
    key = "lora_unet_input_blocks_4_0_in_layers_2"
    def conv(r):
        return {f"{key}.lora_up.weight": torch.randn(640, r, 1, 1, generator=g),
                f"{key}.lora_down.weight": torch.randn(r, 320, 3, 3, generator=g), f"{key}.alpha": torch.tensor(1.0)}
    c, s = lora_from_state_dict(conv(2)), lora_from_state_dict(conv(3))
    merged = merge(c, s, method="sum", content_strength=2.0)
    name = "input_blocks.4.0.in_layers.2"
    assert merged.layers[name].rank == 5
    torch.testing.assert_close(merged.delta(name), 2 * c.layers[name].delta() + s.layers[name].delta())
    again = read_lora(save_merged(merged, tmp_path / "conv.safetensors"))
    torch.testing.assert_close(again.layers[name].delta(), merged.delta(name))


def test_written_files_get_the_users_umask_not_private_modes(tmp_path):
    import os
    import stat

    small = synthetic.to_state_dict(synthetic.random_factors(synthetic.text_encoder_layers(1), 2, 0))
    merged = merge(lora_from_state_dict(small), lora_from_state_dict(small), method="sum")
    old = os.umask(0o022)
    try:
        path = save_merged(merged, tmp_path / "shared.safetensors")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


def test_report_says_what_was_left_out_and_where_alpha_came_from():
    """Issue 9: a layer the reader could not place must show in the merge report (and so in the
    CLI and on the node), not only in a log line; so must 'no alpha anywhere: scale 1'."""
    shapes = {"middle_block.1.transformer_blocks.0.attn1.to_q": (1280, 1280)}
    content_sd = synthetic.to_state_dict(synthetic.random_factors(shapes, 4, 0), alpha=2.0)
    content_sd["lora_unet_some_unknown_block_0.lora_up.weight"] = torch.zeros(8, 4)
    content_sd["lora_unet_some_unknown_block_0.lora_down.weight"] = torch.zeros(4, 8)
    style_sd = synthetic.to_state_dict(synthetic.random_factors(shapes, 4, 1))  # no alpha anywhere
    merged = merge(lora_from_state_dict(content_sd, source="c"), lora_from_state_dict(style_sd, source="s"),
                   method="sum")
    assert merged.report.left_out == {"content": 1}
    assert "1 layer(s) of the content LoRA LEFT OUT" in merged.report.summary()
    assert any(n.startswith("content LoRA:") and "not recognised" in n for n in merged.report.notes)
    assert any(n.startswith("style LoRA:") and "scale 1" in n for n in merged.report.notes)
    assert merged.with_strengths(0.5, 0.5).report.notes == merged.report.notes
