"""Files as diffusers, peft and transformers 5 really write them (issue 9, items 1-3).

Two kinds of test: hand-built fixtures of those exact key and header layouts (always run), and
files written by the real diffusers/peft code paths, compared with what peft itself computes
(need the `thirdparty` extra; skipped with the reason otherwise)."""

from __future__ import annotations

import json
import re
import time

import pytest
import torch
from safetensors.torch import save_file

from hypernet import lora as lora_mod
from hypernet import naming
from hypernet.errors import LoraFormatError
from hypernet.inspection import describe_lora
from hypernet.lora import read_lora
from hypernet.peft_settings import PatternMatcher
from hypernet.tooling import synthetic
from tests.support.files import write_lora

# A few real SDXL layers of each kind and width, all 12 CLIP-L layers' attention (the 48 layers
# transformers 5 renamed), and CLIP-G's first layer.
UNET = {n: s for n, s in naming.sdxl_linear_layers().items()
        if n.startswith(("input_blocks.4.1.transformer_blocks.0.", "middle_block.1.transformer_blocks.0."))}
CLIP_L_ATTENTION = {f"te1.text_model.encoder.layers.{i}.self_attn.{p}": (768, 768)
                    for i in range(12) for p in ("q_proj", "k_proj", "v_proj", "out_proj")}
CLIP_G = {n: s for n, s in synthetic.text_encoder_layers(1).items() if n.startswith("te2.")}
SHAPES = {**UNET, **CLIP_L_ATTENTION, **CLIP_G}


def _settings(**unet):
    return {"unet": synthetic.peft_lora_config(**{"r": 4, "lora_alpha": 8, **unet}),
            "text_encoder": synthetic.peft_lora_config(r=4, lora_alpha=2, target_modules=["q_proj", "k_proj", "v_proj", "out_proj"]),
            "text_encoder_2": synthetic.peft_lora_config(r=4, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "out_proj"])}


def _diffusers_file(tmp_path, settings, name="pytorch_lora_weights.safetensors"):
    sd, metadata, scales = synthetic.diffusers_lora(SHAPES, settings, seed=1)
    return write_lora(tmp_path / name, sd, metadata), sd, scales


# ------------------------------------------------------------------ diffusers save_lora_weights

def test_alpha_from_lora_adapter_metadata_gives_the_right_delta(tmp_path):
    path, sd, scales = _diffusers_file(tmp_path, _settings())
    lora = read_lora(path)
    assert set(lora.layers) == set(SHAPES) and not lora.unrecognised_keys
    assert lora.alpha_sources == {lora_mod.ALPHA_FROM_HEADER: len(SHAPES)}
    name = "input_blocks.4.1.transformer_blocks.0.attn1.to_q"
    layer = lora.layers[name]
    assert layer.scale == 2.0  # lora_alpha 8 / r 4: with scale 1 every ΔW was off by half
    module = "unet." + naming.ldm_to_diffusers(name)
    expected = 2.0 * sd[f"{module}.lora.up.weight"] @ sd[f"{module}.lora.down.weight"]
    torch.testing.assert_close(layer.delta(), expected)
    for canonical, scale in scales.items():
        assert lora.layers[canonical].scale == pytest.approx(scale), canonical
    assert lora.layers["te1.text_model.encoder.layers.3.self_attn.k_proj"].scale == pytest.approx(0.5)
    assert lora.layers["te2.text_model.encoder.layers.0.mlp.fc1"].scale == pytest.approx(4.0)
    assert not lora.scale_assumed_layers
    assert any("lora_adapter_metadata" in note for note in lora.notes)


def test_rank_and_alpha_patterns_follow_peft_and_rslora_uses_the_square_root(tmp_path):
    settings = _settings(rank_pattern={"attn2.to_k": 8, "ff.net.2": 2},
                         alpha_pattern={"middle_block_never": 1, "attn1.to_q": 32, "to_q": 3})
    path, _, scales = _diffusers_file(tmp_path, settings)
    lora = read_lora(path)
    q1 = lora.layers["input_blocks.4.1.transformer_blocks.0.attn1.to_q"]
    q2 = lora.layers["input_blocks.4.1.transformer_blocks.0.attn2.to_q"]
    k2 = lora.layers["input_blocks.4.1.transformer_blocks.0.attn2.to_k"]
    ff = lora.layers["input_blocks.4.1.transformer_blocks.0.ff.net.2"]
    assert (q1.scale, q2.scale) == (32 / 4, 3 / 4)  # first matching key in the file's order
    assert (k2.rank, k2.scale) == (8, 8 / 8)
    assert (ff.rank, ff.scale) == (2, 8 / 2)
    for canonical, scale in scales.items():
        assert lora.layers[canonical].scale == pytest.approx(scale), canonical
    rs = read_lora(_diffusers_file(tmp_path, _settings(use_rslora=True), "rs.safetensors")[0])
    assert rs.layers["middle_block.1.transformer_blocks.0.attn1.to_q"].scale == pytest.approx(8 / 4 ** 0.5)


def test_an_alpha_tensor_wins_over_the_header(tmp_path):
    sd, metadata, _ = synthetic.diffusers_lora(UNET, _settings(), seed=1)
    module = "unet." + naming.ldm_to_diffusers("middle_block.1.transformer_blocks.0.attn2.to_v")
    sd[f"{module}.alpha"] = torch.tensor(1.0)
    lora = read_lora(write_lora(tmp_path / "mixed.safetensors", sd, metadata))
    layer = lora.layers["middle_block.1.transformer_blocks.0.attn2.to_v"]
    assert (layer.alpha_source, layer.scale) == (lora_mod.ALPHA_FROM_TENSOR, 0.25)
    assert lora.layers["middle_block.1.transformer_blocks.0.attn2.to_k"].alpha_source == lora_mod.ALPHA_FROM_HEADER


def test_a_file_with_no_alpha_anywhere_says_scale_1_is_assumed(tmp_path):
    sd, _, _ = synthetic.diffusers_lora(UNET, _settings(), seed=1)
    path = write_lora(tmp_path / "plain.safetensors", sd, {"format": "pt"})
    lora = read_lora(path)
    assert sorted(lora.scale_assumed_layers) == sorted(UNET)
    assert all(layer.scale == 1.0 for layer in lora.layers.values())
    assert any("scale 1 (alpha = rank) assumed" in note for note in lora.notes)
    info = describe_lora(path)
    assert info["scale_assumed_layers"] == len(UNET) and info["alphas"] == {"None": len(UNET)}
    assert any("scale 1" in note for note in info["notes"])


def test_inspect_shows_the_header_alpha_names_the_writer_and_counts_every_dtype(tmp_path):
    path, _, _ = _diffusers_file(tmp_path, _settings())
    info = describe_lora(path)
    assert info["key_layouts"] == {lora_mod.LAYOUT_DIFFUSERS: 2 * len(SHAPES)}
    assert info["alphas"] == {"8.0": len(UNET), "2.0": len(CLIP_L_ATTENTION), "16.0": len(CLIP_G)}
    assert info["alpha_sources"] == {"lora_adapter_metadata": len(SHAPES)}
    kohya = synthetic.diffusers_kohya_lora(UNET)  # int64 alphas
    info = describe_lora(write_lora(tmp_path / "k.safetensors", kohya))
    assert info["dtypes"] == {"float32": 2 * len(UNET), "int64": len(UNET)}


@pytest.mark.parametrize("entry, message", [
    ('{"unet.r": "four", "unet.lora_alpha": 8}', "r must be a positive integer"),
    ('{"unet.r": 4, "unet.lora_alpha": [8]}', "lora_alpha must be a finite number"),
    ('{"unet.r": 4, "unet.rank_pattern": {"to_q": 0}}', "rank_pattern must be"),
    ('{"unet.r": 4, "unet.r": 8}', "appears twice"),
    ('{"unet.r": 4, "unet.alpha_pattern": {"(a+)+$": 2}}', "repeats a group"),
    ('{"unet.r": 4, "unet.alpha_pattern": {"to_[q": 2}}', "not a valid regular expression"),
    ('[' * 100000, "not valid JSON"),
    ('"just a string"', "expected a JSON object"),
])
def test_bad_lora_adapter_metadata_is_one_clear_error(tmp_path, entry, message):
    sd, _, _ = synthetic.diffusers_lora(UNET, _settings(), seed=1)
    path = write_lora(tmp_path / "bad_meta.safetensors", sd, {"lora_adapter_metadata": entry})
    with pytest.raises(LoraFormatError, match=rf"bad_meta\.safetensors: header entry lora_adapter_metadata.*{re.escape(message)}"):
        read_lora(path)


LITERAL_CASES = ["to_q", "attn1.to_q", "transformer_blocks.0.attn1.to_q", "^down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
                 "^attn1.to_q", "o_q", "to_out.0", "to_out", "0.attn1", "blocks.1", "ff.net.2", "net.2", "attn1_to_q", "a-b"]
MODULES = ["down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q", "mid_block.attentions.0.transformer_blocks.0.attn2.to_out.0",
           "up_blocks.0.attentions.2.transformer_blocks.9.ff.net.2", "encoder.layers.0.self_attn.q_proj", "attn1_to_q", "to_q"]


def test_the_pattern_fast_path_equals_peft_s_regex_rule():
    matcher = PatternMatcher("t")
    for pattern in LITERAL_CASES + ["attn.*to_q", "layers\\.[0-3]\\.self_attn"]:
        for module in MODULES:
            expected = re.match(rf"(.*\.)?({pattern})$", module) is not None  # peft.utils.other.get_pattern_key
            assert matcher._matches(pattern, module) == expected, (pattern, module)


def test_a_costly_pattern_cannot_hang_the_reader(tmp_path):
    sd, _, _ = synthetic.diffusers_lora(UNET, _settings(), seed=1)
    # one unbounded repetition passes the structure check; a long module name makes it quadratic
    meta = {"lora_adapter_metadata": json.dumps({"unet.r": 4, "unet.alpha_pattern": {".*x": 2}})}
    started = time.perf_counter()
    read_lora(write_lora(tmp_path / "slow.safetensors", sd, meta))
    assert time.perf_counter() - started < 10


# ------------------------------------------------------------------ peft save_pretrained

def _peft_folder(tmp_path, config):
    folder = tmp_path / "adapter"
    folder.mkdir()
    sd, scales = synthetic.peft_adapter(UNET, config, seed=2)
    write_lora(folder / "adapter_model.safetensors", sd)
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return folder, sd, scales


def test_peft_adapter_config_beside_the_file_gives_alpha(tmp_path):
    config = synthetic.peft_lora_config(r=4, lora_alpha=12, rank_pattern={"attn2.to_q": 2}, alpha_pattern={"attn2.to_q": 1})
    folder, sd, scales = _peft_folder(tmp_path, config)
    for path in (folder, folder / "adapter_model.safetensors"):
        lora = read_lora(path)
        assert lora.key_layouts == {lora_mod.LAYOUT_PEFT: len(sd)}
        assert lora.alpha_sources == {lora_mod.ALPHA_FROM_ADAPTER_CONFIG: len(UNET)}
        for canonical, scale in scales.items():
            assert lora.layers[canonical].scale == pytest.approx(scale), canonical
    assert lora.layers["input_blocks.4.1.transformer_blocks.0.attn2.to_q"].scale == pytest.approx(0.5)
    assert lora.layers["input_blocks.4.1.transformer_blocks.0.attn1.to_q"].scale == pytest.approx(3.0)


def test_peft_rslora_and_a_stray_config_beside_another_file(tmp_path):
    folder, sd, _ = _peft_folder(tmp_path, synthetic.peft_lora_config(r=4, lora_alpha=12, use_rslora=True))
    lora = read_lora(folder)
    assert lora.layers["middle_block.1.transformer_blocks.0.attn1.to_q"].scale == pytest.approx(12 / 2)
    # the same tensors renamed in the same folder: that config is not theirs
    write_lora(folder / "renamed.safetensors", sd)
    other = read_lora(folder / "renamed.safetensors")
    assert all(layer.scale == 1.0 for layer in other.layers.values()) and other.scale_assumed_layers


@pytest.mark.parametrize("text, message", [("{", "not valid JSON"), ('{"r": -1}', "r must be a positive integer"),
                                           ('{"use_rslora": "yes"}', "use_rslora must be true or false")])
def test_bad_adapter_config_is_one_clear_error(tmp_path, text, message):
    folder, _, _ = _peft_folder(tmp_path, synthetic.peft_lora_config())
    (folder / "adapter_config.json").write_text(text)
    with pytest.raises(LoraFormatError, match=rf"adapter_config\.json.*{re.escape(message)}"):
        read_lora(folder)


def test_peft_wrapped_clip_is_told_apart_by_width():
    """One peft adapter wraps one model; CLIP-L (flattened) and CLIP-G differ only in width."""
    for shapes, cut in ((CLIP_L_ATTENTION, 2), (CLIP_G, 1)):  # drop `te1.text_model.` / `te2.`
        sd = {}
        for name, (up, down) in synthetic.random_factors(shapes, 2, 0).items():
            module = name.split(".", cut)[cut]
            sd[f"base_model.model.{module}.lora_A.weight"] = down
            sd[f"base_model.model.{module}.lora_B.weight"] = up
        assert set(lora_mod.lora_from_state_dict(sd, source="peft clip").layers) == set(shapes)


# ------------------------------------------------------------------ transformers-5 names

def test_transformers_5_clip_l_names_map_to_te1_in_both_writers(tmp_path):
    kohya = synthetic.diffusers_kohya_lora(SHAPES, rank=4)
    assert "lora_te1_encoder_layers_11_self_attn_out_proj.lora_down.weight" in kohya
    assert kohya["lora_te1_encoder_layers_0_self_attn_q_proj.alpha"].dtype == torch.int64
    assert kohya["lora_te1_encoder_layers_0_self_attn_q_proj.alpha"].dim() == 0
    for path in (write_lora(tmp_path / "kohya_export.safetensors", kohya), _diffusers_file(tmp_path, _settings())[0]):
        lora = read_lora(path)
        assert not lora.unrecognised_keys, lora.unrecognised_keys[:3]
        assert set(lora.text_encoder_layers) == set(CLIP_L_ATTENTION) | set(CLIP_G)  # all 48 CLIP-L layers
    layer = read_lora(tmp_path / "kohya_export.safetensors").layers["te1.text_model.encoder.layers.5.self_attn.v_proj"]
    assert (layer.alpha, layer.scale) == (4.0, 1.0)


def test_old_and_new_clip_l_names_are_one_layer():
    up, down = torch.zeros(768, 2), torch.zeros(2, 768)
    sd = {"lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": up,
          "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": down,
          "lora_te1_encoder_layers_0_self_attn_q_proj.lora_up.weight": up,
          "lora_te1_encoder_layers_0_self_attn_q_proj.lora_down.weight": down}
    with pytest.raises(LoraFormatError, match="te1.text_model.encoder.layers.0.self_attn.q_proj appears twice"):
        lora_mod.lora_from_state_dict(sd, source="both")


def test_old_diffusers_text_encoder_processor_names():
    sd = {"text_encoder.text_model.encoder.layers.0.self_attn.to_q_lora.up.weight": torch.zeros(768, 2),
          "text_encoder.text_model.encoder.layers.0.self_attn.to_q_lora.down.weight": torch.zeros(2, 768),
          "text_encoder.text_model.encoder.layers.0.self_attn.to_out_lora.up.weight": torch.zeros(768, 2),
          "text_encoder.text_model.encoder.layers.0.self_attn.to_out_lora.down.weight": torch.zeros(2, 768)}
    lora = lora_mod.lora_from_state_dict(sd, source="old te")
    assert set(lora.layers) == {"te1.text_model.encoder.layers.0.self_attn.q_proj",
                                "te1.text_model.encoder.layers.0.self_attn.out_proj"}
    assert lora.key_layouts == {lora_mod.LAYOUT_DIFFUSERS_PROCESSOR: 4}


# ------------------------------------------------------------------ the real packages

@pytest.fixture(scope="module")
def thirdparty():
    """diffusers, peft and transformers, or a skip that says how to get them."""
    try:
        import diffusers  # noqa: F401
        import peft  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as exc:
        pytest.skip(f"needs diffusers, peft and transformers (pip install -e '.[thirdparty]'): {exc}")
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(0)
    # SDXL's block layout (attentions in down 1/2, mid, up 0/1) at toy widths
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16, 16),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=16, attention_head_dim=2, norm_num_groups=4, transformer_layers_per_block=1)
    text = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, vocab_size=64,
                max_position_embeddings=8)
    te1 = CLIPTextModel(CLIPTextConfig(**text))
    te2 = CLIPTextModelWithProjection(CLIPTextConfig(**text, projection_dim=16))
    return unet, te1, te2


def _add_adapter(model, config):
    """`model.add_adapter(config)` as the training scripts call it. transformers >= 5.24 refuses
    peft < 0.22 there (the newest peft here is 0.21); its add_adapter is peft's injection plus the
    config under `peft_config`, done directly then."""
    from peft import inject_adapter_in_model

    try:
        model.add_adapter(config)
    except ValueError as exc:
        if "version of PEFT" not in str(exc):
            raise
        inject_adapter_in_model(config, model, "default")
        model.peft_config = {"default": config}


def _randomise_lora(model, seed):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.1)


def _peft_deltas(model, canonical) -> dict[str, torch.Tensor]:
    """ΔW of every LoRA module as peft computes it (scaling included), by canonical name."""
    from peft.tuners.lora import LoraLayer as PeftLoraLayer

    return {canonical(name): module.get_delta_weight("default").detach().float()
            for name, module in model.named_modules() if isinstance(module, PeftLoraLayer)}


def _canonical_te(encoder):
    return lambda module: naming.text_encoder_canonical(encoder, module)


@pytest.mark.slow
def test_real_diffusers_save_lora_weights_reads_as_peft_computes_it(thirdparty, tmp_path):
    from diffusers.loaders import StableDiffusionXLLoraLoaderMixin
    from diffusers.utils import (
        convert_all_state_dict_to_peft,
        convert_state_dict_to_diffusers,
        convert_state_dict_to_kohya,
    )
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    unet, te1, te2 = thirdparty
    # the train_dreambooth_lora_sdxl.py way, with lora_alpha != r and per-module patterns
    _add_adapter(unet, LoraConfig(r=4, lora_alpha=8, init_lora_weights="gaussian",
                                target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                                rank_pattern={"attn2.to_k": 2}, alpha_pattern={"attn1.to_q": 32}))
    text_config = dict(r=4, lora_alpha=2, init_lora_weights="gaussian", target_modules=["q_proj", "k_proj", "v_proj", "out_proj"])
    _add_adapter(te1, LoraConfig(**text_config))
    _add_adapter(te2, LoraConfig(**{**text_config, "use_rslora": True, "lora_alpha": 6}))
    for i, model in enumerate((unet, te1, te2)):
        _randomise_lora(model, i)
    folder = tmp_path / "diffusers"
    StableDiffusionXLLoraLoaderMixin.save_lora_weights(
        folder,
        unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(unet)),
        text_encoder_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(te1)),
        text_encoder_2_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(te2)),
        unet_lora_adapter_metadata=unet.peft_config["default"].to_dict(),
        text_encoder_lora_adapter_metadata=te1.peft_config["default"].to_dict(),
        text_encoder_2_lora_adapter_metadata=te2.peft_config["default"].to_dict())
    path = folder / "pytorch_lora_weights.safetensors"
    lora = read_lora(path)
    expected = {**_peft_deltas(unet, naming.diffusers_to_ldm), **_peft_deltas(te1, _canonical_te("te1")),
                **_peft_deltas(te2, _canonical_te("te2"))}
    assert not lora.unrecognised_keys and set(lora.layers) == set(expected)
    assert any(n.startswith("te1.text_model.encoder.layers.1.") for n in lora.layers)
    for name, delta in expected.items():
        torch.testing.assert_close(lora.layers[name].delta(), delta, rtol=1e-5, atol=1e-7, msg=name)
    assert lora.alpha_sources == {lora_mod.ALPHA_FROM_HEADER: len(expected)}
    assert describe_lora(path)["key_layouts"] == {lora_mod.LAYOUT_DIFFUSERS: 2 * len(expected)}

    # its kohya exporter (--output_kohya_format): transformers-5 te1 names, int64 alpha = rank
    from safetensors.torch import load_file

    kohya = convert_state_dict_to_kohya(convert_all_state_dict_to_peft(load_file(str(path))))
    assert any(k.startswith("lora_te1_encoder_layers_") for k in kohya)
    save_file(kohya, str(tmp_path / "kohya.safetensors"))
    exported = read_lora(tmp_path / "kohya.safetensors")
    assert not exported.unrecognised_keys and set(exported.layers) == set(expected)
    # the exporter writes alpha = rank, so scale 1 (it drops lora_alpha; that is diffusers' doing)
    name = "te1.text_model.encoder.layers.0.self_attn.q_proj"
    assert exported.layers[name].scale == 1.0
    torch.testing.assert_close(exported.layers[name].delta(), expected[name] / 0.5, rtol=1e-5, atol=1e-7)


@pytest.mark.slow
def test_real_peft_save_pretrained_reads_as_peft_computes_it(thirdparty, tmp_path):
    from peft import LoraConfig, get_peft_model

    unet = thirdparty[0]
    for use_rslora in (False, True):
        model = get_peft_model(type(unet).from_config(unet.config), LoraConfig(
            r=4, lora_alpha=12, use_rslora=use_rslora, init_lora_weights="gaussian",
            target_modules=["to_q", "to_out.0", "ff.net.2"], **({} if use_rslora else {"rank_pattern": {"ff.net.2": 2}})))
        _randomise_lora(model, 5)
        folder = tmp_path / f"peft_rs{use_rslora}"
        model.save_pretrained(folder)
        lora = read_lora(folder)
        expected = _peft_deltas(model.base_model.model, naming.diffusers_to_ldm)
        assert set(lora.layers) == set(expected) and lora.key_layouts.keys() == {lora_mod.LAYOUT_PEFT}
        for name, delta in expected.items():
            torch.testing.assert_close(lora.layers[name].delta(), delta, rtol=1e-5, atol=1e-7, msg=name)


# ------------------------------------------------------------------ merged files in diffusers

def _fresh_sdxl_layout_unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    # SDXL's block layout (two layers per block, so SGM's input_blocks.4/5 are down_blocks.1's two
    # attentions, as diffusers maps kohya's SDXL names) at toy widths
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(8, 16, 16),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=16, attention_head_dim=2, norm_num_groups=4, transformer_layers_per_block=1)


def _loha_state_dict(shapes, rank, seed):
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for name, (out, inp) in shapes.items():
        key = naming.ldm_to_kohya_key(name)
        for part in ("1", "2"):
            sd[f"{key}.hada_w{part}_a"] = torch.randn(out, rank, generator=gen) * 0.3
            sd[f"{key}.hada_w{part}_b"] = torch.randn(rank, inp, generator=gen) * 0.3
        sd[f"{key}.alpha"] = torch.tensor(float(rank))
    return sd


@pytest.mark.slow
@pytest.mark.parametrize("inputs", ["lora", "loha"])
@pytest.mark.parametrize("method", ["lorarar", "np-lora", "sum"])
def test_merged_files_load_in_diffusers_as_the_merge(thirdparty, tmp_path, method, inputs):
    """README's claim, with the real diffusers: a merged file (LoRA × LoRA, and LoHa × LoRA, whose
    LoHa side is written as its exact rank-r² factors) goes through diffusers' kohya converter and
    into an SDXL-layout UNet, where peft's own ΔW equals the library's merge."""
    from diffusers.loaders import StableDiffusionXLLoraLoaderMixin

    from hypernet.merge import merge
    from hypernet.model import HypernetConfig, HyperNetwork
    from hypernet.writer import save_merged

    unet = _fresh_sdxl_layout_unet()
    shapes = {naming.diffusers_to_ldm(n): tuple(m.weight.shape) for n, m in unet.named_modules()
              if isinstance(m, torch.nn.Linear) and ".attentions." in n}
    content_sd = (_loha_state_dict(shapes, 2, 1) if inputs == "loha"
                  else synthetic.to_state_dict(synthetic.random_factors(shapes, 4, 1), "kohya", alpha=2.0))
    style_sd = synthetic.to_state_dict(synthetic.random_factors(shapes, 3, 2), "kohya", alpha=3.0)
    content = lora_mod.lora_from_state_dict(content_sd, source="content")
    style = lora_mod.lora_from_state_dict(style_sd, source="style")
    hypernet = None
    if method == "lorarar":
        hypernet = HyperNetwork(HypernetConfig(hidden=8, widths=(16,)))
        with torch.no_grad():
            for p in hypernet.parameters():
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(3))
    merged = merge(content, style, hypernet, 0.8, 1.2, method)
    path = save_merged(merged, tmp_path / "merged.safetensors")
    assert {layer.kind for layer in read_lora(path).layers.values()} == {"lora"}  # plain LoRA, no .diff / hada_
    # as StableDiffusionXLPipeline.load_lora_weights calls it
    state_dict, alphas = StableDiffusionXLLoraLoaderMixin.lora_state_dict(str(path), unet_config=unet.config)
    StableDiffusionXLLoraLoaderMixin.load_lora_into_unet(state_dict, alphas, unet, adapter_name="default")
    loaded = _peft_deltas(unet, naming.diffusers_to_ldm)
    assert set(loaded) == set(merged.layers)
    for name in merged.layers:
        expected = merged.delta(name)
        assert (loaded[name] - expected).abs().max() <= 1e-5 * expected.abs().max() + 1e-7, name


@pytest.mark.slow
def test_a_merge_with_a_full_difference_is_what_diffusers_cannot_load(thirdparty, tmp_path):
    """The documented exception: a layer kept as a full difference (`.diff`: an input that is
    itself a full difference) makes diffusers' kohya converter refuse the whole file."""
    from diffusers.loaders import StableDiffusionXLLoraLoaderMixin

    from hypernet.merge import merge
    from hypernet.writer import save_merged

    name = "input_blocks.4.1.transformer_blocks.0.attn1.to_q"
    diff = lora_mod.lora_from_state_dict({f"{naming.ldm_to_kohya_key(name)}.diff": torch.randn(16, 16) * 0.01})
    plain = lora_mod.lora_from_state_dict(synthetic.to_state_dict(synthetic.random_factors({name: (16, 16)}, 2, 0)))
    path = save_merged(merge(diff, plain, method="sum"), tmp_path / "with_diff.safetensors")
    with pytest.raises(Exception):  # noqa: B017 — diffusers' own error type varies between versions
        StableDiffusionXLLoraLoaderMixin.lora_state_dict(str(path))
