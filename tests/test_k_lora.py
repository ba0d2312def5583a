"""K-LoRA's switch rule against a literal dense implementation of it: at progress p, an attention
projection uses the content LoRA iff S_c/γ > S_s·(α·p + β), with S the sum of the top-k |entries|
of the dense ΔW and γ the mean of Σ|ΔW_c|/Σ|ΔW_s| over those layers (float64, from the raw kohya
tensors; no library code)."""

from __future__ import annotations

import re

import pytest
import torch

from hypernet.errors import LoraRarError
from hypernet.lora import lora_from_state_dict
from hypernet.merge import merge
from hypernet.methods import k_lora
from hypernet.tooling import synthetic
from hypernet.writer import save_merged
from tests.support.loras import lycoris_layers

ATTENTION = {
    f"input_blocks.4.1.transformer_blocks.0.attn1.{p}": (640, 640) for p in ("to_q", "to_k", "to_v", "to_out.0")
} | {
    "input_blocks.4.1.transformer_blocks.0.attn2.to_q": (640, 640),
    "input_blocks.4.1.transformer_blocks.0.attn2.to_k": (640, 2048),
    "input_blocks.4.1.transformer_blocks.0.attn2.to_v": (640, 2048),
    "input_blocks.4.1.transformer_blocks.0.attn2.to_out.0": (640, 640),
    "middle_block.1.transformer_blocks.0.attn1.to_q": (1280, 1280),
}
OTHER = {"input_blocks.4.1.transformer_blocks.0.ff.net.2": (640, 2560),
         "te1.text_model.encoder.layers.0.self_attn.q_proj": (768, 768)}
SHAPES = ATTENTION | OTHER
# Content magnitudes per layer, so that the switch points spread over p < 0, 0 < p < 1 and p > 1.
CONTENT_SCALES = [0.2, 0.6, 0.8, 1.0, 1.2, 1.5, 1.9, 2.4, 3.5, 1.0, 1.0]


@pytest.fixture(scope="module")
def pair_sd():
    content = synthetic.random_factors(SHAPES, 4, seed=31)
    content = {n: (up * scale, down) for (n, (up, down)), scale in zip(content.items(), CONTENT_SCALES)}
    return (synthetic.to_state_dict(content, alpha=2.0),
            synthetic.to_state_dict(synthetic.random_factors(SHAPES, 8, seed=32), alpha=8.0))


@pytest.fixture(scope="module")
def pair(pair_sd):
    return lora_from_state_dict(pair_sd[0]), lora_from_state_dict(pair_sd[1])


def kohya(name: str) -> str:
    prefix, rest = ("lora_te1_", name[4:]) if name.startswith("te1.") else ("lora_unet_", name)
    return prefix + rest.replace(".", "_")


def dense(sd: dict, name: str) -> torch.Tensor:
    module = kohya(name)
    up, down = sd[f"{module}.lora_up.weight"].double(), sd[f"{module}.lora_down.weight"].double()
    return float(sd[f"{module}.alpha"]) / down.shape[0] * up @ down


class LiteralRule:
    """The rule exactly as docs/methods.md states it, evaluated at a given p."""

    def __init__(self, content_sd, style_sd, top_k=64, alpha=1.5, beta=0.5):
        self.alpha, self.beta = alpha, beta
        self.deltas = {n: (dense(content_sd, n), dense(style_sd, n)) for n in ATTENTION}
        self.s = {n: tuple(float(d.abs().flatten().topk(top_k).values.sum()) for d in pair)
                  for n, pair in self.deltas.items()}
        ratios = [float(c.abs().sum() / s.abs().sum()) for c, s in self.deltas.values()]
        self.gamma = sum(ratios) / len(ratios)

    def uses_content(self, name: str, p: float) -> bool:
        s_c, s_s = self.s[name]
        return s_c / self.gamma > s_s * (self.alpha * p + self.beta)

    def crossing(self, name: str) -> float:
        s_c, s_s = self.s[name]
        return ((s_c / self.gamma) / s_s - self.beta) / self.alpha


@pytest.mark.parametrize(("top_k", "alpha", "beta"), [(64, 1.5, 0.5), (8, 2.0, 0.3)])
def test_switch_rule_equals_the_literal_dense_rule(pair_sd, pair, top_k, alpha, beta):
    rule = LiteralRule(*pair_sd, top_k, alpha, beta)
    cs, ss = 0.7, 1.2
    merged = merge(*pair, None, cs, ss, "k-lora", params={"top_k": top_k, "alpha": alpha, "beta": beta})
    assert set(merged.switch_points) == set(ATTENTION)
    assert merged.report.method_layers == len(ATTENTION) and merged.report.summed_layers == len(OTHER)
    grid = [i / 8 for i in range(9)]
    seen = set()
    for name, (dc, ds) in rule.deltas.items():
        sides = {True: cs * dc, False: ss * ds}
        checked = {}  # side → a delta_at result already compared with the literal side
        assert merged.switch_points[name] == pytest.approx(rule.crossing(name), rel=1e-5, abs=1e-7)
        for p in grid + [rule.crossing(name) - 1e-4, rule.crossing(name) + 1e-4]:
            content = rule.uses_content(name, p)
            seen.add(content)
            got = merged.delta_at(name, p)
            # bit-equal to a result already checked against this side is the same check, without
            # another float64 comparison of the whole layer (~0.1 s each for 640 × 2048)
            if content in checked and torch.equal(got, checked[content]):
                continue
            torch.testing.assert_close(got.double(), sides[content], rtol=1e-5, atol=1e-9)
            checked[content] = got
    assert seen == {True, False}
    points = sorted(merged.switch_points.values())
    assert points[0] < 0 and points[-1] > 1 and any(0 < p < 1 for p in points)  # the fixture's spread


def test_other_layers_are_summed_at_every_p(pair_sd, pair):
    merged = merge(*pair, None, 0.5, 2.0, "k-lora")
    for name in OTHER:
        expected = 0.5 * dense(pair_sd[0], name) + 2.0 * dense(pair_sd[1], name)
        for p in (0.0, 0.5, 1.0):
            torch.testing.assert_close(merged.delta_at(name, p).double(), expected, rtol=1e-5, atol=1e-9)


def test_switch_points_do_not_depend_on_the_strengths(pair):
    a = merge(*pair, None, 1.0, 1.0, "k-lora")
    b = merge(*pair, None, 0.2, 3.0, "k-lora")
    assert a.switch_points == b.switch_points


def test_rows_chunked_magnitudes_equal_whole_layer(pair, monkeypatch):
    whole = merge(*pair, method="k-lora")
    monkeypatch.setattr(k_lora, "CHUNK_ELEMENTS", 3000)  # a few rows per chunk
    chunked = merge(*pair, method="k-lora")
    for name, p in whole.switch_points.items():
        assert chunked.switch_points[name] == pytest.approx(p, rel=1e-6)


def test_magnitudes_of_a_dense_adapter(pair):
    lyco = lora_from_state_dict(lycoris_layers(640, 640))
    shapes = {f"input_blocks.4.1.transformer_blocks.0.attn1.{p}": (640, 640) for p in ("to_q", "to_v", "to_out.0")}
    plain = lora_from_state_dict(synthetic.to_state_dict(synthetic.random_factors(shapes, 4, 5), alpha=4))
    merged = merge(lyco, plain, method="k-lora", params={"top_k": 16}, dora="drop-magnitude")  # to_out.0 is DoRA
    deltas = {n: (lyco.layers[n].delta().double(), plain.layers[n].delta().double()) for n in shapes}
    ratios = [float(c.abs().sum() / s.abs().sum()) for c, s in deltas.values()]
    gamma = sum(ratios) / len(ratios)
    for name, (dc, ds) in deltas.items():
        s_c, s_s = (float(d.abs().flatten().topk(16).values.sum()) for d in (dc, ds))
        assert merged.switch_points[name] == pytest.approx(((s_c / gamma) / s_s - 0.5) / 1.5, rel=1e-5)


def test_not_one_lora_refuses_export_by_name(pair, tmp_path):
    merged = merge(*pair, method="k-lora")
    target = tmp_path / "k.safetensors"
    with pytest.raises(LoraRarError, match=r"k-lora merge switches between the two LoRAs during sampling"):
        save_merged(merged, target)
    assert not target.exists() and list(tmp_path.iterdir()) == []
    for export in (merged.to_state_dict, merged.side_state_dicts):
        with pytest.raises(LoraRarError, match="k-lora"):
            export()


def test_zero_style_layer_keeps_the_content():
    shapes = {"input_blocks.4.1.transformer_blocks.0.attn1.to_q": (64, 64),
              "input_blocks.4.1.transformer_blocks.0.attn1.to_k": (64, 64)}
    content = synthetic.random_factors(shapes, 2, seed=1)
    style = synthetic.random_factors(shapes, 2, seed=2)
    q = next(iter(shapes))
    style[q] = (torch.zeros_like(style[q][0]), style[q][1])
    merged = merge(lora_from_state_dict(synthetic.to_state_dict(content)),
                   lora_from_state_dict(synthetic.to_state_dict(style)), method="k-lora")
    assert merged.switch_points[q] == float("inf")
    assert torch.equal(merged.delta_at(q, 1.0), merged.layers[q].content.delta())


@pytest.mark.parametrize(("params", "needle"), [
    ({"top_k": 0}, "top_k must be a whole number >= 1"),
    ({"alpha": 0.0}, "alpha must be a number > 0"),
    ({"alpha": -1.5}, "alpha must be a number > 0"),
    ({"beta": float("nan")}, "beta must be a finite number"),
    ({"top_k": "many"}, "top_k must be int"),
])
def test_bad_parameters_are_one_clear_error(pair, params, needle):
    with pytest.raises(LoraRarError, match="k-lora") as info:
        merge(*pair, method="k-lora", params=params)
    assert needle in str(info.value)


def test_progress_counts_the_switched_layers(pair):
    calls = []
    merge(*pair, method="k-lora", progress=lambda done, total: calls.append((done, total)))
    assert calls[-1] == (len(ATTENTION), len(ATTENTION))
    assert all(re.match(r"^\d+$", str(d)) for d, _ in calls)


def test_cli_writes_the_schedule_and_refuses_a_lora_file(pair_sd, tmp_path, capsys):
    import json

    from hypernet.cli import main
    from tests.support.files import write_lora

    content, style = write_lora(tmp_path / "c.safetensors", pair_sd[0]), write_lora(tmp_path / "s.safetensors", pair_sd[1])
    refused = tmp_path / "k.safetensors"
    assert main(["merge", str(content), str(style), "-o", str(refused), "--method", "k-lora"]) == 1
    err = capsys.readouterr().err
    assert "k-lora merge switches between the two LoRAs during sampling" in err and ".json" in err
    assert not refused.exists()
    out = tmp_path / "k.json"
    assert main(["merge", str(content), str(style), "-o", str(out), "--method", "k-lora", "--k-top-k", "8",
                 "--k-alpha", "2", "--k-beta", "0.3"]) == 0
    document = json.loads(out.read_text())
    rule = LiteralRule(*pair_sd, 8, 2.0, 0.3)
    assert document["params"] == {"top_k": 8, "alpha": 2.0, "beta": 0.3, "device": "cpu"}
    assert set(document["switch_points"]) == {kohya(n) for n in ATTENTION}
    for name in ATTENTION:
        assert document["switch_points"][kohya(name)] == pytest.approx(rule.crossing(name), rel=1e-5)


# --- node logic (no ComfyUI) ------------------------------------------------------------------

def test_switch_plan_splits_static_and_switching_layers(pair):
    from hypernet import naming
    from hypernet.nodelogic import merge as merge_logic

    merged = merge(*pair, None, 0.7, 1.2, "k-lora")
    plan = merge_logic.switch_plan(merged, include_text_encoders=True)
    moving = {n for n, p in merged.switch_points.items() if 0 < p < 1}
    assert set(plan.points) == {naming.ldm_to_kohya_key(n) for n in moving}
    assert (plan.content_strength, plan.style_strength) == (0.7, 1.2)
    static = {role: {k.rsplit(".", 2)[0] for k in sd} for (sd, _), role in zip(plan.static, ("content", "style"))}
    for name, p in merged.switch_points.items():
        module = naming.ldm_to_kohya_key(name)
        in_content, in_style = module in static["content"], module in static["style"]
        if p <= 0:
            assert (in_content, in_style) == (False, True), name
        elif p >= 1:
            assert (in_content, in_style) == (True, False), name
        else:
            assert not in_content and not in_style and f"{module}.lora_up.weight" in plan.content
            assert f"{module}.lora_up.weight" in plan.style
    for name in OTHER:
        module = naming.ldm_to_kohya_key(name)
        assert module in static["content"] and module in static["style"]
    # every patch together is delta_at(p) for a p between the switch points: check p = 0
    total = {}
    for sd, strength in plan.static + [(plan.content, plan.content_strength)]:
        for key in sd:
            if key.endswith(".lora_up.weight"):
                module = key[: -len(".lora_up.weight")]
                up, down = sd[key].double(), sd[f"{module}.lora_down.weight"].double()
                scale = float(sd[f"{module}.alpha"]) / down.shape[0]
                total[module] = total.get(module, 0) + strength * scale * up @ down
    for name in merged.layers:
        torch.testing.assert_close(total[naming.ldm_to_kohya_key(name)], merged.delta_at(name, 0.0).double(),
                                   rtol=1e-5, atol=1e-9)
    without_te = merge_logic.switch_plan(merged, include_text_encoders=False)
    assert not any(k.startswith("lora_te") for sd, _ in without_te.static for k in sd)


def test_timeline_orders_layers_by_switch_point_and_counts_by_noise_level():
    from hypernet.nodelogic.switching import SwitchTimeline

    timeline = SwitchTimeline({"a": 0.6, "b": 0.1, "c": 0.35, "d": 0.1})
    assert timeline.order == ["b", "d", "c", "a"]
    # A made-up monotone schedule: sigma = 10·(1 − p).
    timeline.set_noise_levels(lambda p: 10 * (1 - p))
    assert [timeline.switched(s) for s in (10.0, 9.0, 6.5, 6.4, 4.0, 0.5)] == [0, 2, 3, 3, 4, 4]
    assert timeline.switched(9.0) == 2  # sigma exactly at b's and d's level: p = p_l → style


def test_merged_lora_output_of_k_lora_explains_itself(pair, tmp_path):
    from hypernet.nodelogic import lora as lora_logic
    from hypernet.nodelogic import merge as merge_logic

    merged = merge(*pair, method="k-lora")
    output = merge_logic.merged_lora_output(merged, {}, {}, None)
    assert isinstance(output, dict)
    for use in (len, list, bool, lambda d: d.keys(), lambda d: d.items(), lambda d: d["x"], lambda d: "x" in d):
        with pytest.raises(LoraRarError, match="merged_lora: a k-lora merge switches between the two LoRAs"):
            use(output)
    with pytest.raises(LoraRarError, match="k-lora"):
        lora_logic.save_lora_model(output, tmp_path, "k/merged")
    with pytest.raises(LoraRarError, match="k-lora"):
        lora_logic.lora_file_of(output, "content LoRA")
    assert list(tmp_path.iterdir()) == []


def test_node_params_take_only_the_chosen_methods_widgets():
    from hypernet.nodelogic.merge import node_params

    widgets = {"mu": 2.0, "np_rank": 0, "np_side": "output", "k_top_k": 16, "k_alpha": 1.0, "k_beta": 0.2}
    assert node_params("np-lora", widgets) == {"mu": 2.0, "rank": None, "side": "output"}
    assert node_params("np-lora", {**widgets, "np_rank": 8})["rank"] == "8"
    assert node_params("k-lora", widgets) == {"top_k": 16, "alpha": 1.0, "beta": 0.2}
    assert node_params("sum", widgets) == {} and node_params("lorarar", widgets) == {}
    assert node_params("np-lora", {}) == {}  # an old workflow without the new widgets: defaults


def test_plot_shows_each_layers_switch_point(pair):
    from PIL import ImageStat

    from hypernet.nodelogic import merge as merge_logic
    from hypernet.nodelogic import plot

    merged = merge(*pair, method="k-lora")
    image = merge_logic.coefficient_image(merged, "dog", "watercolor", "")
    assert image.shape[0] == 1 and image.shape[-1] == 3 and image.shape[2] >= 800
    switches = plot.layer_switches(merged.switch_points)
    assert [s.name for s in switches] == [n for n in ATTENTION if n in merged.switch_points]  # UNet order
    picture = plot.switch_plot(switches, "t")
    # a layer that uses the style throughout is orange from top to bottom, one with p_l >= 1 blue
    assert max(ImageStat.Stat(picture).stddev) > 10
    empty = plot.switch_plot([], "t")
    assert empty.getpixel((10, 400)) == plot.BACKGROUND


def test_device_setting_gives_the_same_switch_points_and_refuses_a_missing_device(pair):
    on_cpu = merge(*pair, method="k-lora", params={"device": "cpu"})
    assert on_cpu.switch_points == merge(*pair, method="k-lora").switch_points
    with pytest.raises(LoraRarError, match="k-lora: device must be a torch device"):
        merge(*pair, method="k-lora", params={"device": "no-such-device"})
