"""What the hypernetwork contributes to a merge (issue 17): the merge's own figures against the
dense formulation, the report, metadata and warning, the probe, the trainer's collapse watch,
and one clear error for each bad input."""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path

import pytest
import torch

from hypernet.cli import main
from hypernet.errors import HypernetError, LoraFormatError
from hypernet.lora import lora_from_state_dict
from hypernet.merge import merge
from hypernet.methods import lorarar, lorarar_cpu
from hypernet.methods.lorarar_diagnostics import OFF_LEVEL
from hypernet.model import HypernetConfig, HyperNetwork, load_hypernet, save_hypernet
from hypernet.probe import probe_magnitudes, probe_pair, read_for_probe
from hypernet.writer import merge_metadata
from tests.support.files import OFFICIAL_DIR, OFFICIAL_SDXL, REPO, write_lora
from tests.support.loras import lycoris_layers, sample_lora
from tests.support.training import make_dataset, one_thread  # noqa: F401 - fixture

REAL_LORAS = Path(os.environ.get("LORARAR_REAL_LORAS") or REPO.parent / "shared" / "real-loras")
OFFICIAL_KOALA = OFFICIAL_DIR / "lorarar_koala700m_hypernet.pth"


def random_hypernet(seed: int = 0, widths=(640, 1280), hidden: int = 32, scale: float = 0.5,
                    input_gain: float = 60.0) -> HyperNetwork:
    """A hypernetwork whose input term is comparable to its bias for the sample LoRAs (so that
    the figures are far from trivial: coefficients vary, some negative)."""
    gen = torch.Generator().manual_seed(seed)
    model = HyperNetwork(HypernetConfig(hidden=hidden, widths=widths))
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=gen) * scale)
        for width in widths:  # ΔW columns of the sample are ~1e-2: a weight that makes W1·x matter
            model.input_layer(width).weight.mul_(input_gain)
    return model.eval()


@pytest.fixture(scope="module")
def pair():
    content = lora_from_state_dict(sample_lora(rank=8, seed=1, alpha=4), source="content.safetensors")
    style = lora_from_state_dict(sample_lora(rank=16, seed=2, alpha=16), source="style.safetensors")
    return content, style


def dense_figures(hypernet: HyperNetwork, content, style, names):
    """Per width, the figures computed the slow way: dense ΔW, every column through H in float64."""
    groups = {}
    for name in names:
        groups.setdefault(content.layers[name].shape[0], []).append(name)
    out = {}
    for width, group in groups.items():
        first, head = hypernet.input_layer(width), hypernet.output[1]
        w1, b1, w2, b2 = (t.detach().double() for t in (first.weight, first.bias, head.weight, head.bias))
        h0 = w2 @ torch.relu(b1) + b2
        m_cs, m_ss, ratios, norms = [], [], [], [0.0, 0.0, 0.0, 0.0]
        for name in group:
            delta_c, delta_s = content.layers[name].delta().double(), style.layers[name].delta().double()
            term = torch.cat([delta_c, delta_s]).T @ w1.T
            m = torch.relu(term + b1) @ w2.T + b2
            m_c, m_s = m[:, 0], m[:, 1]
            m_cs.append(m_c)
            m_ss.append(m_s)
            ratios.append(term.norm(dim=1) / b1.norm())
            merged = delta_c * m_c + delta_s * m_s
            fixed = delta_c * h0[0] + delta_s * h0[1]
            summed = delta_c + delta_s
            norms = [a + float(b) for a, b in zip(norms, ((merged - fixed).norm() ** 2, fixed.norm() ** 2,
                                                           (merged - summed).norm() ** 2, summed.norm() ** 2))]
        m_c, m_s = torch.cat(m_cs), torch.cat(m_ss)
        out[width] = {"h0": h0.tolist(), "mean": [float(m_c.mean()), float(m_s.mean())],
                      "spread": [float(m_c.std(correction=0)), float(m_s.std(correction=0))],
                      "negative": [float((m_c < 0).double().mean()), float((m_s < 0).double().mean())],
                      "input_to_bias": float(torch.cat(ratios).mean()),
                      "distance_from_h0": math.sqrt(norms[0] / norms[1]),
                      "input_effect": math.sqrt(norms[0] / norms[3]),
                      "distance_from_sum": math.sqrt(norms[2] / norms[3])}
    return out


def assert_figures_match(contribution, reference, rel=1e-4):
    assert set(contribution.widths) == set(reference)
    for width, expected in reference.items():
        got = contribution.widths[width]
        assert list(got.h0) == pytest.approx(expected["h0"], rel=rel, abs=1e-6)
        assert list(got.mean) == pytest.approx(expected["mean"], rel=rel, abs=1e-6)
        assert list(got.spread) == pytest.approx(expected["spread"], rel=rel, abs=1e-6)
        assert list(got.negative) == pytest.approx(expected["negative"], abs=2e-3)  # a column near 0 may flip
        assert got.input_to_bias == pytest.approx(expected["input_to_bias"], rel=rel)
        assert got.distance_from_h0 == pytest.approx(expected["distance_from_h0"], rel=rel)
        assert got.input_effect == pytest.approx(expected["input_effect"], rel=rel)
        assert got.distance_from_sum == pytest.approx(expected["distance_from_sum"], rel=rel)


# ---------------------------------------------------------------------------------------------
# The figures

def test_merge_figures_equal_the_dense_formulation(pair):
    content, style = pair
    hypernet = random_hypernet()
    merged = lorarar.lorarar_merge(content, style, hypernet)
    contribution = merged.contribution
    assert_figures_match(contribution, dense_figures(hypernet, content, style, list(merged.coefficients)))
    figures = contribution.widths[640]
    assert 0 < figures.negative[0] < 1 and figures.spread[0] > 0.05  # a pair that moves H: not trivial
    assert figures.layers == 8 and figures.columns == 8 * 640  # the sample's whole 640-wide block (2 transformer blocks)
    assert contribution.widths[1280].layers == 4


def test_h0_is_what_h_gives_a_zero_column():
    hypernet = random_hypernet(3)
    for width in hypernet.widths:
        zeros = torch.zeros(1, 2 * width)
        assert hypernet.zero_input_coefficients(width) == pytest.approx(hypernet(zeros)[0].tolist(), abs=1e-6)


@pytest.mark.parametrize("count", [1, 5])
def test_every_arrangement_of_the_pass_measures_alike(monkeypatch, pair, count):
    """The CPU pass (chunks, blocks, bias folded into the head) and the batched call accelerators
    run give the same coefficients and the same measures, and measuring changes no coefficient."""
    monkeypatch.setattr(lorarar_cpu, "CHUNK", 3)
    monkeypatch.setattr(lorarar_cpu, "BLOCK", 2)
    content, style = pair
    names = [n for n in lorarar.hypernet_layers(content, style, random_hypernet()) if content.layers[n].shape[0] == 640]
    names = (names * 2)[:count]
    hypernet = random_hypernet(1)
    contents, styles = [content.layers[n] for n in names], [style.layers[n] for n in names]
    measures = torch.empty(count, 4, 640)
    with torch.no_grad():
        plain = lorarar_cpu.group_coefficients(hypernet, contents, styles)
        measured = lorarar_cpu.group_coefficients(hypernet, contents, styles, measures=measures)
        m_c, m_s, batched = lorarar.accelerator_group_coefficients(hypernet, contents, styles, torch.device("cpu"),
                                                                   measure=True)
    torch.testing.assert_close(measured, plain, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.stack([m_c, m_s], 1), plain, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(measures, batched, rtol=1e-4, atol=1e-9)


def test_layers_without_a_low_rank_form_are_measured_too():
    """LoHa/DoRA/full-difference layers go through H densely; their figures are the same maths."""
    shapes = {"input_blocks.4.1.transformer_blocks.0.attn1." + p: (640, 640) for p in ("to_q", "to_k", "to_v", "to_out.0")}
    content = lora_from_state_dict(lycoris_layers(640, 640, seed=1), source="lycoris.safetensors")
    style = lora_from_state_dict(sample_lora(rank=4, seed=3, alpha=4, shapes=shapes), source="style.safetensors")
    hypernet = random_hypernet(2, scale=0.05)
    merged = lorarar.lorarar_merge(content, style, hypernet)
    assert not content.layers["input_blocks.4.1.transformer_blocks.0.attn1.to_q"].is_low_rank  # the dense path
    assert_figures_match(merged.contribution, dense_figures(hypernet, content, style, list(merged.coefficients)))


def fixed_recipe_hypernet(input_weight: float = 0.0) -> HyperNetwork:
    """H(0) = (−0.5, +1.0) at 640 and (+0.02, +0.2) at 1280 — the official checkpoint's shape of
    recipe; with input_weight 0 it ignores its input entirely."""
    model = HyperNetwork(HypernetConfig(hidden=4, widths=(640, 1280)))
    with torch.no_grad():
        for width, bias in ((640, [0.5, 1.0, 0.0, 0.0]), (1280, [0.0, 0.0, 0.02, 0.2])):
            layer = model.input_layer(width)
            layer.weight.copy_(torch.randn(layer.weight.shape, generator=torch.Generator().manual_seed(width))
                               * input_weight)
            layer.bias.copy_(torch.tensor(bias))
        model.output[1].weight.copy_(torch.tensor([[-1.0, 0.0, 1.0, 0.0], [0.0, 1.0, 0.0, 1.0]]))
        model.output[1].bias.zero_()
    return model.eval()


def test_a_fixed_recipe_is_reported_with_the_blocks_it_inverts_and_switches_off(pair, tmp_path):
    content, style = pair
    merged = merge(content, style, fixed_recipe_hypernet(), 1.0, 0.7, "lorarar")
    contribution = merged.contribution
    assert contribution.distance_from_h0 == 0 == contribution.input_effect and contribution.widths[640].input_to_bias == 0
    assert contribution.widths[640].h0 == pytest.approx((-0.5, 1.0))
    assert contribution.widths[640].negative == (1.0, 0.0)
    notes = merged.report.notes
    summary = next(n for n in notes if n.startswith("hypernetwork: "))
    assert "mostly H's fixed recipe" in summary and "by 0%" in summary and "640-wide m_c -0.50" in summary
    warning = next(n for n in notes if n.startswith("hypernetwork warning: the content LoRA"))
    assert "inverted" in warning and "in 4" in warning  # the sample's 640-wide block
    assert f"switched off (|m_c| < {OFF_LEVEL:g}) in most columns of mid" in warning  # m_c = 0.02 at 1280
    assert not any("style LoRA is" in n for n in notes)  # m_s 1.0 and 0.2: neither
    # the strengths do not change what H did; the report goes with every strength
    again = merged.with_strengths(0.3, 1.0)
    assert again.contribution is contribution and summary in again.report.notes
    meta = merge_metadata(merged, hypernet_name="fixed")
    figures = json.loads(meta["lorarar.hypernet_contribution"])
    assert len(meta["lorarar.hypernet_contribution"]) < 2048
    assert figures["widths"]["640"]["h0"] == [-0.5, 1.0] and figures["distance_from_h0"] == 0
    assert figures["inverted"]["content"] == ["input_blocks.4.1"]
    assert figures["switched_off"]["content"] == ["middle_block.1"] and figures["switched_off"]["style"] == []


def test_a_hypernetwork_that_reacts_says_so(pair):
    content, style = pair
    merged = merge(content, style, fixed_recipe_hypernet(input_weight=30.0), 1.0, 1.0, "lorarar")
    assert merged.contribution.input_effect > 0.25
    assert any("the coefficients depend on your LoRAs" in n for n in merged.report.notes)


def test_other_methods_carry_no_contribution(pair):
    content, style = pair
    for method in ("sum", "np-lora"):
        merged = merge(content, style, None, 1.0, 1.0, method)
        assert merged.contribution is None
        assert "lorarar.hypernet_contribution" not in merge_metadata(merged)


def test_cli_merge_prints_the_summary_and_records_it(sample_lora_pair, random_hypernet_pth, tmp_path, capsys):
    from safetensors import safe_open

    out = tmp_path / "merged.safetensors"
    assert main(["merge", *map(str, sample_lora_pair), "-o", str(out), "--hypernet", str(random_hypernet_pth)]) == 0
    err = capsys.readouterr().err
    assert "note: hypernetwork: the coefficients" in err
    with safe_open(str(out), "pt") as f:
        figures = json.loads(f.metadata()["lorarar.hypernet_contribution"])
    assert set(figures["widths"]) == {"640", "1280"}


# ---------------------------------------------------------------------------------------------
# Bad input: one clear error each

def test_a_hypernetwork_for_other_widths_is_one_error(pair):
    content, style = pair
    sd15 = random_hypernet(widths=(320,))
    with pytest.raises(HypernetError, match=r"640/1280 wide; this hypernetwork supports widths 320"):
        merge(content, style, sd15, method="lorarar")
    with pytest.raises(HypernetError, match=r"640/1280 wide; this hypernetwork has input layers for widths 320 only"):
        probe_pair(sd15, content, style)


def test_loras_without_hypernetwork_layers_are_one_error_for_the_probe(pair):
    content, _ = pair
    shapes = {"input_blocks.4.1.transformer_blocks.0.ff.net.2": (640, 2560)}
    other = lora_from_state_dict(sample_lora(rank=4, seed=5, shapes=shapes), source="ff_only.safetensors")
    with pytest.raises(HypernetError, match=r"content.safetensors and ff_only.safetensors share no layer the "
                                            r"hypernetwork merges \(to_q/to_out.0"):
        probe_pair(random_hypernet(), content, other)
    merged = merge(content, other, random_hypernet(), method="lorarar")  # the merge itself still sums them
    assert merged.contribution is None and any("no layer was merged by the hypernetwork" in n for n in merged.report.notes)


def test_nan_in_the_hypernetwork_is_one_error(pair, tmp_path, capsys):
    content, style = pair
    broken = random_hypernet()
    with torch.no_grad():
        broken.input_layer(1280).weight[3, 7] = float("nan")
    with pytest.raises(HypernetError, match=r"input\.1280\.weight contains NaN or Inf"):
        merge(content, style, broken, method="lorarar")
    with pytest.raises(HypernetError, match=r"input\.1280\.weight contains NaN or Inf"):
        probe_pair(broken, content, style)
    path = tmp_path / "broken.safetensors"
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in broken.state_dict().items()}, str(path), broken.config.to_metadata())
    assert main(["probe", str(path)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "input.1280.weight contains NaN or Inf" in err[0]


def test_coefficients_that_overflow_are_one_error_naming_the_layer(pair):
    content, style = pair
    tensors = sample_lora(rank=8, seed=1)
    # finite, at float32's edge (normalised first: 1e38 / max is itself beyond float32)
    huge = lora_from_state_dict({k: v / v.abs().max() * 1e38 if "lora_up" in k else v
                                 for k, v in tensors.items()}, source="huge.safetensors")
    with pytest.raises(HypernetError, match=r"layer input_blocks\.4\.1\.transformer_blocks\.0\.attn1\.to_q: the "
                                            r"hypernetwork's coefficients are not finite"):
        merge(huge, style, random_hypernet(), method="lorarar")


# ---------------------------------------------------------------------------------------------
# The probe

@pytest.fixture(scope="module")
def small_hypernet_file(tmp_path_factory) -> Path:
    """A hypernetwork for widths SDXL does not have: the synthetic probe stays tiny."""
    model = random_hypernet(4, widths=(48, 96), hidden=16, scale=1.0, input_gain=1.0)
    return save_hypernet(model, tmp_path_factory.mktemp("h") / "small.safetensors")


def test_probe_magnitudes_scale_the_input_term_exactly(small_hypernet_file):
    hypernet = load_hypernet(small_hypernet_file)
    document = probe_magnitudes(hypernet, (0.1, 1.0, 10.0), rank=4)
    rows = {row["magnitude"]: row for row in document["magnitudes"]}
    for width in ("48", "96"):
        ratios = [rows[m]["widths"][width]["input_to_bias"] for m in (0.1, 1.0, 10.0)]
        assert ratios[1] == pytest.approx(10 * ratios[0], rel=1e-3) and ratios[2] == pytest.approx(10 * ratios[1], rel=1e-3)
        h0 = rows[0.1]["widths"][width]["h0"]
        assert rows[0.1]["widths"][width]["mean"] == pytest.approx(h0, abs=0.05)  # small input: H(0)
    distances = [rows[m]["input_effect"] for m in (0.1, 1.0, 10.0)]
    assert distances == sorted(distances) and distances[0] < 0.25 < distances[2]


def test_probe_cli_json_and_table(small_hypernet_file, capsys):
    assert main(["probe", str(small_hypernet_file), "--magnitudes", "0.5,2", "--rank", "2"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert [row["magnitude"] for row in document["magnitudes"]] == [0.5, 2.0]
    assert set(document["hypernetwork"]["widths"]) == {"48", "96"}
    assert main(["probe", str(small_hypernet_file), "--magnitudes", "1", "--table"]) == 0
    table = capsys.readouterr().out
    assert "|W1x|/|b1|" in table and "x1 " in table
    assert main(["probe", str(small_hypernet_file), "one.safetensors"]) == 1
    assert "expected no LoRA or a pair" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["probe", str(small_hypernet_file), "--magnitudes", "0,-1"])


def test_probe_on_a_pair_equals_the_merge(sample_lora_pair, random_hypernet_pth, capsys):
    assert main(["probe", str(random_hypernet_pth), *map(str, sample_lora_pair)]) == 0
    captured = capsys.readouterr()
    document = json.loads(captured.out)
    merged = merge(read_for_probe(sample_lora_pair[0]), read_for_probe(sample_lora_pair[1]),
                   load_hypernet(random_hypernet_pth), method="lorarar")
    assert document["widths"] == merged.contribution.as_dict()["widths"]
    assert document["layers"] == 12 and document["left_out"] == {}
    assert f"note: {document['summary']}" in captured.err


def test_probe_reads_the_two_sd15_era_forms(tmp_path):
    """diffusers' save_attn_procs keys without `unet.`, and cloneofsimo's numbered modules
    (SD1.x order: down 0–2, up 1–3, mid; attn1, GEGLU, attn2 per block) — widths checked."""
    gen = torch.Generator().manual_seed(0)
    processor = {}
    for proj in ("to_q", "to_out"):
        key = f"mid_block.attentions.0.transformer_blocks.0.attn1.processor.{proj}_lora"
        processor[f"{key}.up.weight"] = torch.randn(1280, 2, generator=gen)
        processor[f"{key}.down.weight"] = torch.randn(2, 1280, generator=gen)
    lora = read_for_probe(write_lora(tmp_path / "processor.safetensors", processor))
    assert set(lora.layers) == {"middle_block.1.transformer_blocks.0.attn1.to_q",
                                "middle_block.1.transformer_blocks.0.attn1.to_out.0"}

    widths = [320] * 2 + [640] * 2 + [1280] * 2 + [1280] * 3 + [640] * 3 + [320] * 3 + [1280]
    numbered, index = {}, 0
    for width in widths:
        for _projection, (out, inp) in (("q", (width, width)), ("k", (width, width)), ("v", (width, width)),
                                       ("o", (width, width)), ("ff", (8 * width, width)), ("q2", (width, width)),
                                       ("k2", (width, 768)), ("v2", (width, 768)), ("o2", (width, width))):
            numbered[f"unet:{index}:up"] = torch.full((out, 1), float(index))
            numbered[f"unet:{index}:down"] = torch.ones(1, inp)
            index += 1
    path = write_lora(tmp_path / "cloneofsimo.safetensors", numbered, {"unet": '["CrossAttention", "Attention", "GEGLU"]'})
    lora = read_for_probe(path)
    assert len(lora.layers) == 64
    value = {name: float(layer.up[0, 0]) for name, layer in lora.layers.items()}
    assert value["input_blocks.1.1.transformer_blocks.0.attn1.to_q"] == 0
    assert value["input_blocks.1.1.transformer_blocks.0.attn2.to_out.0"] == 8
    assert value["output_blocks.3.1.transformer_blocks.0.attn1.to_q"] == 6 * 9  # up_blocks.1 right after down
    assert value["middle_block.1.transformer_blocks.0.attn2.to_q"] == 15 * 9 + 5  # mid last
    del numbered["unet:143:up"], numbered["unet:143:down"]
    with pytest.raises(LoraFormatError, match=r"143 numbered UNet modules; an SD1.x/2.x UNet .* has 144"):
        read_for_probe(write_lora(tmp_path / "short.safetensors", numbered, {"unet": '["CrossAttention", "GEGLU"]'}))


def _real_files() -> list[Path]:
    files = sorted(REAL_LORAS.glob("*.safetensors"))
    if len(files) < 4:
        pytest.skip(f"the real LoRA files are not at {REAL_LORAS} (never in the repository; set LORARAR_REAL_LORAS)")
    return files


def test_official_checkpoint_on_real_files_is_mostly_its_fixed_recipe():
    """What the official hypernetwork does on real trained files (SD1.5: their 640/1280-wide attention layers go to H
    directly): the official SDXL H inverts the subject on 640-wide to_q/to_out.0 and stays near
    H(0) — the figures docs/methods.md quotes."""
    if not OFFICIAL_SDXL.is_file():
        pytest.skip(f"official SDXL hypernetwork not at {OFFICIAL_SDXL}")
    files = {f.name.split("_")[1] + "_" + f.name.split("_")[2]: f for f in _real_files()}
    hypernet = load_hypernet(OFFICIAL_SDXL)
    content = read_for_probe(files["object_weapons"])
    style = read_for_probe(files["style_storybook"])
    document = probe_pair(hypernet, content, style)
    assert document["left_out"] == {"320": 20}  # SD1.5's 320-wide blocks: no input layer in H
    w640, w1280 = document["widths"]["640"], document["widths"]["1280"]
    assert w640["h0"] == pytest.approx([-0.5703, 0.9836], abs=1e-3)
    assert w640["negative"][0] > 0.95 and w640["mean"][0] == pytest.approx(-0.57, abs=0.05)
    assert w640["input_to_bias"] < 0.2 and w1280["input_to_bias"] < 0.5
    assert document["input_effect"] < 0.25 < document["distance_from_h0"] + 0.25  # quoted in docs/methods.md
    assert any("content LoRA is inverted" in w for w in document["warnings"])
    for path in files.values():  # every real file reads, in whichever form it was written
        assert len(read_for_probe(path).layers) >= 64


# ---------------------------------------------------------------------------------------------
# The trainer watches for collapse

@pytest.mark.usefixtures("one_thread")
def test_trainer_logs_input_dependence_and_warns_on_collapse(tmp_path, caplog):
    from hypernet.training.manifest import load_manifest
    from hypernet.training.testmodel import tiny_base
    from hypernet.training.trainer import Trainer, TrainSettings, build_hypernet

    manifest = load_manifest(make_dataset(tmp_path / "data"))
    base = tiny_base()
    settings = TrainSettings(steps=2, checkpoint_every=0, validate_every=0, validation_draws=1, hidden=8, seed=1)
    healthy = Trainer(base, manifest, settings, tmp_path / "healthy").run()
    record = healthy.history[0]
    assert set(record["input_to_bias"]) == {"32", "64"} and record["collapsed"] is False
    assert all(len(record["spread"][w]) == 2 and max(record["spread"][w]) > 0 for w in record["spread"])
    # an H whose first layers ignore the input: its output is H(0) for every column
    flat = build_hypernet((32, 64), settings, base.family)
    with torch.no_grad():
        for width in (32, 64):
            flat.input_layer(width).weight.zero_()
            flat.input_layer(width).bias.fill_(0.5)
    with caplog.at_level(logging.WARNING, logger="hypernet.training.trainer"):
        collapsed = Trainer(base, manifest, settings, tmp_path / "flat", init_hypernet=flat).run()
    first = collapsed.history[0]
    assert first["collapsed"] is True and first["input_to_bias"] == {"32": 0.0, "64": 0.0}
    warnings = [r.message for r in caplog.records if "hardly depend on its input" in r.message]
    assert len(warnings) == 1 and "step 1" in warnings[0]  # once, not every step

