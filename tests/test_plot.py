"""The pack's pictures (issue 19 point 8, issue 17): every glyph drawn exists in the font, the
coefficient plot's header band holds only its title lines, H(0) is marked and negative
coefficients are explained on the picture."""

from __future__ import annotations

import pytest
import torch
from PIL import ImageDraw

from hypernet import drawing, naming
from hypernet.lora import lora_from_state_dict
from hypernet.merge import merge
from hypernet.model import HypernetConfig, HyperNetwork
from hypernet.nodelogic import merge as merge_logic
from hypernet.nodelogic import plot
from hypernet.training.plot import plot_curves, plot_panels
from tests.support.loras import sample_lora


@pytest.fixture
def drawn(monkeypatch):
    """Every (text, font) handed to PIL while the test runs."""
    calls = []
    original = ImageDraw.ImageDraw.text

    def record(self, xy, text, fill=None, font=None, *args, **kwargs):
        calls.append((text, font if font is not None else self.getfont()))
        return original(self, xy, text, fill, font, *args, **kwargs)

    monkeypatch.setattr(ImageDraw.ImageDraw, "text", record)
    return calls


def sdxl_coefficients(reference_shift: float = 0.0):
    coefficients, references = {}, {}
    for name, (out, inp) in naming.sdxl_linear_layers().items():
        if name.endswith(("attn1.to_q", "attn1.to_out.0", "attn2.to_q", "attn2.to_out.0")):
            h0 = (-0.57, 0.98) if out == 640 else (0.01, 0.23)
            coefficients[name] = (torch.full((inp,), h0[0] + reference_shift), torch.full((inp,), h0[1]))
            references[naming.transformer_block_of(name)] = h0
    return coefficients, references


def test_font_check_finds_what_the_builtin_font_lacks():
    font = drawing.font(14)
    assert "×" in drawing.missing_glyphs("a × b", font) and not drawing.missing_glyphs("a x b ± 0.5 · c", font)
    assert drawing.drawable("content × strength — H(0) ≈ 1", font) == "content x strength - H(0) ~ 1"


def test_every_plot_draws_only_glyphs_its_font_has(drawn):
    coefficients, references = sdxl_coefficients()
    plot.coefficient_plot(plot.block_means(coefficients, references), "LoRA.rar lorarar merge — official",
                          "content dog × 1, style ink × 0.8", caption="H(0) ≈ fixed recipe: moved 6% → little")
    plot.coefficient_plot([], "LoRA.rar sum merge", "content × strength")
    plot.projection_plot(plot.block_values({n: 0.3 for n in coefficients}), "np-lora — test", "×")
    plot.switch_plot(plot.layer_switches({n: 0.4 for n in coefficients}), "k-lora — test", "×")
    plot_panels([({"a — b": [(1, 0.5), (2, 0.4)]}, "loss — ×", False),
                 ({"|W1·x|/|b1|, 640-wide": [(1, 0.1), (2, 0.2)]}, "watch", True)])
    plot_curves({}, "empty — ×")
    assert drawn, "nothing was drawn"
    for text, font in drawn:
        assert not drawing.missing_glyphs(text, font), f"{text!r} would show boxes for {drawing.missing_glyphs(text, font)}"
    assert any("content x strength + style x strength" in text for text, _ in drawn)  # the sum plot's ×


def test_coefficient_plot_header_holds_only_its_title_lines():
    """Nothing (the old "mean coefficient" label) is drawn into the title/subtitle/caption band."""
    coefficients, references = sdxl_coefficients()
    means = plot.block_means(coefficients, references)
    title, subtitle, caption = "LoRA.rar lorarar merge", "content dog.safetensors x1 " * 4, "Mostly H's fixed recipe"
    full = plot.coefficient_plot(means, title, subtitle, caption=caption)
    header, *_ = plot._titled_canvas(full.size, title, subtitle, caption)
    band = (0, 0, full.width, 72)
    assert full.crop(band).tobytes() == header.crop(band).tobytes()


def test_h0_marks_and_the_negative_area_are_drawn():
    coefficients, references = sdxl_coefficients(reference_shift=0.3)
    marked = plot.coefficient_plot(plot.block_means(coefficients, references), "t", "s")
    colours = {c for _, c in marked.getcolors(maxcolors=1 << 16)}
    assert {plot.CONTENT_REFERENCE, plot.STYLE_REFERENCE, plot.NEGATIVE_AREA} <= colours
    bare = plot.coefficient_plot(plot.block_means(coefficients), "t", "s")  # no hypernetwork facts: no marks
    assert plot.CONTENT_REFERENCE not in {c for _, c in bare.getcolors(maxcolors=1 << 16)}
    positive = {n: (m_c.abs() + 0.2, m_s) for n, (m_c, m_s) in coefficients.items()}
    plain = plot.coefficient_plot(plot.block_means(positive), "t", "s")  # nothing below 0: no shaded area
    assert plot.NEGATIVE_AREA not in {c for _, c in plain.getcolors(maxcolors=1 << 16)}


def test_h0_band_sits_at_h0(drawn):
    """The light band of a block is drawn at H(0)'s height, not at the block's mean."""
    coefficients, references = sdxl_coefficients(reference_shift=0.3)
    image = plot.coefficient_plot(plot.block_means(coefficients, references), "t", "s")
    # in 4 is the first block: its x span starts right of the axis; find the band's rows there
    column = [image.getpixel((100, y)) for y in range(image.height)]
    band_rows = [y for y, c in enumerate(column) if c == plot.CONTENT_REFERENCE]
    mean_rows = [y for y, c in enumerate(column) if c == plot.CONTENT_COLOUR]
    assert band_rows and mean_rows and max(mean_rows) < min(band_rows)  # the mean (−0.27) above H(0) (−0.57)
    assert max(band_rows) - min(band_rows) <= 10  # one band, ~9 px thick


def test_merge_node_plot_carries_the_hypernetwork_facts():
    content = lora_from_state_dict(sample_lora(rank=4, seed=1, alpha=4), source="dog.safetensors")
    style = lora_from_state_dict(sample_lora(rank=4, seed=2, alpha=4), source="ink.safetensors")
    torch.manual_seed(0)
    merged = merge(content, style, HyperNetwork(HypernetConfig(hidden=16)).eval(), 1.0, 1.0, "lorarar")
    tensor = merge_logic.coefficient_image(merged, "dog", "ink", "random")
    rgb = (tensor[0] * 255).round().to(torch.int64).reshape(-1, 3)
    packed = set(torch.unique(rgb[:, 0] * 65536 + rgb[:, 1] * 256 + rgb[:, 2]).tolist())
    for r, g, b in (plot.CONTENT_REFERENCE, plot.STYLE_REFERENCE):
        assert r * 65536 + g * 256 + b in packed
