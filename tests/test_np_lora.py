"""NP-LoRA against a literal dense implementation: torch.linalg.svd of the dense style ΔW and the
paper's projector (float64, from the raw kohya tensors; no library code). The projector is applied
as ΔW_c − c·(ΔW_c·V)·Vᵀ, the same product by associativity, which keeps the 2048-wide layers cheap."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from hypernet import naming
from hypernet.errors import LoraRarError
from hypernet.lora import lora_from_state_dict, read_lora
from hypernet.merge import merge
from hypernet.tooling import synthetic
from hypernet.writer import save_merged
from tests.support.loras import lycoris_layers

# Layer shapes that matter: square 640, the 2048-wide text context of attn2.to_k, 1280 output
# of a 640 input (proj), a text-encoder layer; plus one conv layer added by conv_pair().
SHAPES = {
    "input_blocks.4.1.transformer_blocks.0.attn1.to_q": (640, 640),
    "input_blocks.4.1.transformer_blocks.1.attn2.to_k": (640, 2048),
    "output_blocks.3.1.transformer_blocks.1.ff.net.0.proj": (1280, 640),
    "te1.text_model.encoder.layers.0.self_attn.q_proj": (768, 768),
}
CONV = "lora_unet_input_blocks_4_0_in_layers_2"


def conv_entries(rank: int, seed: int, alpha: float | None) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    # a conv LoRA at reduced channel counts (the reader checks factors, not SDXL widths)
    entries = {f"{CONV}.lora_up.weight": torch.randn(320, rank, 1, 1, generator=g) * 0.01,
               f"{CONV}.lora_down.weight": torch.randn(rank, 64, 3, 3, generator=g) / 25}
    if alpha is not None:
        entries[f"{CONV}.alpha"] = torch.tensor(float(alpha))
    return entries


@pytest.fixture(scope="module")
def pair_sd():
    """Content rank 4 with alpha 2, style rank 6 without alpha (scale 1), conv layers included."""
    content = {**synthetic.to_state_dict(synthetic.random_factors(SHAPES, 4, seed=21), alpha=2.0),
               **conv_entries(4, 1, 2.0)}
    style = {**synthetic.to_state_dict(synthetic.random_factors(SHAPES, 6, seed=22)), **conv_entries(6, 2, None)}
    return content, style


@pytest.fixture(scope="module")
def pair(pair_sd):
    return lora_from_state_dict(pair_sd[0]), lora_from_state_dict(pair_sd[1])


def dense(sd: dict, module: str) -> torch.Tensor:
    """ΔW of one kohya module, float64, conv kernels kept."""
    up, down = sd[f"{module}.lora_up.weight"].double(), sd[f"{module}.lora_down.weight"].double()
    alpha = sd.get(f"{module}.alpha")
    scale = float(alpha) / down.shape[0] if alpha is not None else 1.0
    return scale * (up.flatten(1) @ down.flatten(1)).reshape(up.shape[0], *down.shape[1:])


_SVD: dict[tuple[int, str], tuple] = {}


def svd_of(style_sd: dict, module: str):
    """torch.linalg.svd of the dense style ΔW (as a matrix), computed once per module."""
    key = (id(style_sd), module)
    if key not in _SVD:
        ds = dense(style_sd, module)
        _SVD[key] = torch.linalg.svd(ds.reshape(ds.shape[0], -1), full_matrices=False)
    return _SVD[key]


def reference(content_sd, style_sd, module, mu, k=None, side="input", cs=1.0, ss=1.0):
    """ΔW = ss·ΔW_s + cs·ΔW_c·(I − μ/(1+μ)·V_k V_kᵀ) (or the left projector with U_k)."""
    dc, ds = dense(content_sd, module), dense(style_sd, module)
    c = 1.0 if math.isinf(mu) else mu / (1 + mu)
    m_c, m_s = dc.reshape(dc.shape[0], -1), ds.reshape(ds.shape[0], -1)
    u, _, vh = svd_of(style_sd, module)
    k = k or min(m_s.shape[0], m_s.shape[1], style_sd[f"{module}.lora_down.weight"].shape[0])
    if side == "input":
        v = vh[:k].T
        projected = m_c - c * (m_c @ v) @ v.T
    else:
        u = u[:, :k]
        projected = m_c - c * u @ (u.T @ m_c)
    return (cs * projected + ss * m_s).reshape(dc.shape), projected.reshape(dc.shape), m_c.reshape(dc.shape)


def modules(sd):
    return sorted(k[: -len(".lora_up.weight")] for k in sd if k.endswith(".lora_up.weight"))


def name_of(module: str) -> str:
    lora = lora_from_state_dict({f"{module}.lora_up.weight": torch.zeros(1, 1), f"{module}.lora_down.weight": torch.zeros(1, 1)})
    return next(iter(lora.layers))


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float((got.double() - expected).abs().max() / expected.abs().max())


@pytest.mark.parametrize(("mu", "k", "side", "cs", "ss"), [
    (0.5, None, "input", 1.0, 1.0),
    (2.0, 3, "input", 0.8, 1.2),
    (0.5, None, "output", 1.0, 1.0),
    (1.0, 2, "output", 1.3, -0.5),
    (math.inf, None, "input", 1.0, 0.7),
])
def test_equals_dense_reference(pair_sd, pair, mu, k, side, cs, ss):
    content, style = pair
    merged = merge(content, style, None, cs, ss, "np-lora", params={"mu": mu, "rank": k, "side": side})
    assert merged.report.method_layers == len(SHAPES) + 1
    for module in modules(pair_sd[0]):
        expected, _, _ = reference(*pair_sd, module, mu, k, side, cs, ss)
        assert relative_error(merged.delta(name_of(module)), expected) < 2e-5, module


def test_mu_zero_equals_sum(pair):
    content, style = pair
    merged = merge(content, style, None, 0.9, 1.1, "np-lora", params={"mu": 0.0})
    plain = merge(content, style, None, 0.9, 1.1, "sum")
    for name in plain.layers:
        assert torch.equal(merged.delta(name), plain.delta(name))
    assert merged.report.method_layers == 0 and any("plain sum" in n for n in merged.report.notes)


@pytest.mark.parametrize("side", ["input", "output"])
def test_hard_projection_removes_the_style_directions(pair_sd, pair, side):
    content, style = pair
    merged = merge(content, style, method="np-lora", params={"mu": math.inf, "side": side})
    for module in modules(pair_sd[0]):
        name = name_of(module)
        u, _, vh = svd_of(pair_sd[1], module)
        r = pair_sd[1][f"{module}.lora_down.weight"].shape[0]
        projected = merged.layers[name].content.delta().double().reshape(u.shape[0], -1)
        leak = projected @ vh[:r].T if side == "input" else u[:, :r].T @ projected
        assert float(leak.abs().max()) < 1e-5 * float(projected.abs().max()), (module, side)
        # …and a large finite mu approaches it
        nearly = merge(content, style, method="np-lora", params={"mu": 1e6, "side": side})
        torch.testing.assert_close(nearly.delta(name), merged.delta(name), rtol=1e-4, atol=1e-9)


def test_strengths_act_after_the_projection(pair):
    content, style = pair
    base = merge(content, style, method="np-lora")
    scaled = merge(content, style, None, 0.3, 1.7, "np-lora")
    for name, layer in base.layers.items():
        torch.testing.assert_close(scaled.delta(name), 0.3 * layer.content.delta() + 1.7 * layer.style.delta())


def test_removed_share_is_what_the_projection_took(pair_sd, pair):
    content, style = pair
    merged = merge(content, style, method="np-lora", params={"mu": 1.0})
    for module in modules(pair_sd[0]):
        _, projected, original = reference(*pair_sd, module, 1.0)
        share = float((original - projected).norm() / original.norm())
        assert merged.layer_values[name_of(module)] == pytest.approx(share, rel=1e-4)


def test_exported_file_is_an_exact_lora_of_rank_rc_plus_rs(pair, tmp_path):
    content, style = pair
    merged = merge(content, style, None, 1.0, 0.8, "np-lora", params={"side": "output"})
    again = read_lora(save_merged(merged, tmp_path / "np.safetensors"))
    assert set(again.layers) == set(merged.layers)
    for name, layer in again.layers.items():
        assert layer.is_low_rank and layer.rank == 4 + 6
        torch.testing.assert_close(layer.delta(), merged.delta(name), rtol=1e-5, atol=1e-9)


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor any torch op produces (an observer, not a mock)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("side", ["input", "output"])
def test_low_rank_layers_never_form_an_out_by_in_matrix(side):
    shapes = {"input_blocks.7.1.transformer_blocks.3.attn2.to_k": (1280, 2048)}
    content = lora_from_state_dict(synthetic.to_state_dict(synthetic.random_factors(shapes, 8, seed=1)))
    style = lora_from_state_dict(synthetic.to_state_dict(synthetic.random_factors(shapes, 8, seed=2)))
    with LargestTensor() as seen:
        merge(content, style, method="np-lora", params={"side": side})
    assert seen.largest <= 8 * 2048, seen.largest  # a factor's size; ΔW would be 1280 × 2048


def test_rank_deficient_style_projects_only_its_real_directions():
    """A style whose 4 down rows span only 2 directions: the other 2 singular vectors are
    numerical noise and must not be projected out."""
    shapes = {"input_blocks.4.1.transformer_blocks.0.attn1.to_v": (640, 640)}
    (c_up, c_down), = synthetic.random_factors(shapes, 4, seed=3).values()
    (s_up, s_down), = synthetic.random_factors(shapes, 4, seed=4).values()
    s_down = torch.cat([s_down[:2], s_down[:2] * 0.5 + s_down[1:2]])
    name = next(iter(shapes))
    content = lora_from_state_dict(synthetic.to_state_dict({name: (c_up, c_down)}))
    style = lora_from_state_dict(synthetic.to_state_dict({name: (s_up, s_down)}))
    merged = merge(content, style, method="np-lora", params={"mu": math.inf})
    ds = (s_up.double() @ s_down.double())
    _, values, vh = torch.linalg.svd(ds)
    assert values[2] < 1e-6 * values[0]
    v = vh[:2].T
    expected = c_up.double() @ c_down.double() @ (torch.eye(640, dtype=torch.float64) - v @ v.T)
    assert relative_error(merged.layers[name].content.delta(), expected) < 1e-5


def test_dense_adapters_use_the_dense_formula():
    lyco = lora_from_state_dict(lycoris_layers(128, 128))
    shapes = {f"input_blocks.4.1.transformer_blocks.0.attn1.{p}": (128, 128) for p in ("to_q", "to_v", "to_out.0")}
    plain = lora_from_state_dict(synthetic.to_state_dict(synthetic.random_factors(shapes, 4, 5), alpha=4))
    for content, style in ((lyco, plain), (plain, lyco)):
        merged = merge(content, style, method="np-lora", params={"mu": 0.5}, dora="drop-magnitude")  # to_out.0 is DoRA
        assert merged.report.method_layers == 3
        for name in shapes:
            dc, ds = content.layers[name].delta().double(), style.layers[name].delta().double()
            _, values, vh = torch.linalg.svd(ds)
            # a dense style has no factor rank: its numerical rank is used
            k = 4 if style.layers[name].is_low_rank else int((values > values[0] * 1e-4).sum())
            v = vh[:k].T
            expected = dc - (0.5 / 1.5) * (dc @ v) @ v.T + ds
            assert relative_error(merged.delta(name), expected) < 1e-5, name


@pytest.mark.parametrize(("params", "needle"), [
    ({"mu": -1.0}, "mu must be a number >= 0"),
    ({"mu": "lots"}, "mu must be float"),
    ({"rank": "abc"}, "rank must be 'all'"),
    ({"rank": 0}, "rank must be 'all'"),
    ({"side": "left"}, "side must be one of input, output"),
    ({"k": 3}, "unknown parameter(s) k"),
])
def test_bad_parameters_are_one_clear_error(pair, params, needle):
    with pytest.raises(LoraRarError, match="np-lora") as info:
        merge(*pair, method="np-lora", params=params)
    assert needle in str(info.value)


def test_rank_above_the_style_rank_uses_all_and_says_so(pair_sd, pair):
    merged = merge(*pair, method="np-lora", params={"rank": "10"})
    assert any("rank 10 exceeds" in n for n in merged.report.notes)
    module = modules(pair_sd[0])[0]
    expected, _, _ = reference(*pair_sd, module, 0.5)
    assert relative_error(merged.delta(name_of(module)), expected) < 2e-5


@pytest.mark.slow
def test_full_sdxl_pair_projects_every_shared_layer():
    content = lora_from_state_dict(synthetic.sdxl_lora(rank=4, seed=1, te_layers=1))
    style = lora_from_state_dict(synthetic.sdxl_lora(rank=4, seed=2, te_layers=1))
    merged = merge(content, style, method="np-lora")
    assert merged.report.method_layers == len(merged.layers) == len(naming.sdxl_linear_layers()) + 2 * 6
    assert all(0 < v < 1 for v in merged.layer_values.values())


def test_cli_writes_an_np_lora_file_with_its_settings(pair_sd, tmp_path, capsys):
    import json

    from hypernet.cli import main
    from tests.support.files import write_lora

    content, style = write_lora(tmp_path / "c.safetensors", pair_sd[0]), write_lora(tmp_path / "s.safetensors", pair_sd[1])
    out = tmp_path / "np.safetensors"
    assert main(["merge", str(content), str(style), "-o", str(out), "--method", "np-lora", "--mu", "2",
                 "--np-rank", "3", "--np-side", "output", "--style-strength", "0.5"]) == 0
    saved = read_lora(out)
    assert saved.metadata["lorarar.method"] == "np-lora"
    assert json.loads(saved.metadata["lorarar.params"]) == {"mu": 2.0, "rank": "3", "side": "output"}
    module = modules(pair_sd[0])[0]
    expected, _, _ = reference(*pair_sd, module, 2.0, 3, "output", 1.0, 0.5)
    assert relative_error(saved.layers[name_of(module)].delta(), expected) < 2e-5
    capsys.readouterr()
    # A setting of another method is refused, naming both, before anything is written.
    assert main(["merge", str(content), str(style), "-o", str(tmp_path / "x.safetensors"), "--method", "sum",
                 "--mu", "1"]) == 1
    assert "--mu is a setting of --method np-lora, not of --method sum" in capsys.readouterr().err
    assert not (tmp_path / "x.safetensors").exists()


def test_plot_shows_the_removed_share_per_block(pair):
    from hypernet.nodelogic import merge as merge_logic
    from hypernet.nodelogic import plot

    merged = merge(*pair, method="np-lora")
    values = plot.block_values(merged.layer_values)
    assert [(v.block, v.index) for v in values] == [("input_blocks.4.1", 0), ("input_blocks.4.1", 1),
                                                    ("output_blocks.3.1", 1)]
    block = values[0]
    expected = [merged.layer_values[n] for n in merged.layer_values if n.startswith("input_blocks.4.1.transformer_blocks.0.")]
    assert block.value == pytest.approx(sum(expected) / len(expected))
    image = merge_logic.coefficient_image(merged, "dog", "watercolor", "")
    assert image.shape[0] == 1 and float(image.std()) > 0.05
