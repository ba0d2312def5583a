"""The command line: `python -m hypernet …` end to end, including how it fails."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from hypernet.cli import main
from hypernet.lora import read_lora
from hypernet.tooling import synthetic
from tests.support.files import write_lora
from tests.support.loras import sample_lora, sd15_lora

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(("pair", "method_layers"), [
    ("sample_lora_pair", 12),  # the sample's 3 transformer blocks × attn1/attn2 × to_q/to_out.0
    pytest.param("lora_pair", 280, marks=pytest.mark.slow),  # all of SDXL: the end-to-end full-size merge
])
def test_merge_command_writes_a_merged_lora(pair, method_layers, official_sdxl_path, tmp_path, capsys, request):
    lora_pair = request.getfixturevalue(pair)
    out = tmp_path / "merged.safetensors"
    rc = main(["merge", str(lora_pair[0]), str(lora_pair[1]), "-o", str(out), "--hypernet", str(official_sdxl_path),
               "--content-strength", "0.9", "--style-strength", "1.1", "--dtype", "fp16"])
    assert rc == 0 and capsys.readouterr().out.strip() == str(out)
    merged = read_lora(out)
    assert merged.metadata["lorarar.method"] == "lorarar"
    assert merged.metadata["lorarar.hypernet_sha256"] == "0cfa9772a0c56020a38c0bebd33834703cf915ead96136cf316be5b27e933b05"
    assert json.loads(merged.metadata["lorarar.report"])["method_layers"] == method_layers
    assert merged.layers["middle_block.1.transformer_blocks.0.attn1.to_q"].rank == 8 + 16
    # refuses to overwrite, before doing any work
    assert main(["merge", str(lora_pair[0]), str(lora_pair[1]), "-o", str(out), "--method", "sum"]) == 1
    assert "already exists" in capsys.readouterr().err
    assert main(["merge", str(lora_pair[0]), str(lora_pair[1]), "-o", str(out), "--method", "sum", "--force"]) == 0
    assert read_lora(out).metadata["lorarar.method"] == "sum"


def test_merge_prints_its_report_and_notes_as_output(tmp_path, capsys):
    """Issue 9: left-out layers and an assumed alpha are CLI output (stderr), not only log lines;
    stdout stays the one path scripts read."""
    import torch

    shapes = {"middle_block.1.transformer_blocks.0.attn1.to_q": (1280, 1280)}
    content_sd = synthetic.to_state_dict(synthetic.random_factors(shapes, 4, 0), alpha=2.0)
    content_sd["lora_unet_some_unknown_block_0.lora_up.weight"] = torch.zeros(8, 4)
    content_sd["lora_unet_some_unknown_block_0.lora_down.weight"] = torch.zeros(4, 8)
    content = write_lora(tmp_path / "c.safetensors", content_sd)
    style = write_lora(tmp_path / "s.safetensors", synthetic.to_state_dict(synthetic.random_factors(shapes, 4, 1)))
    out = tmp_path / "o.safetensors"
    assert main(["merge", str(content), str(style), "-o", str(out), "--method", "sum"]) == 0
    captured = capsys.readouterr()
    assert captured.out.strip() == str(out)
    err = captured.err.splitlines()
    assert any(line.startswith("merged: method sum") and "1 layer(s) of the content LoRA LEFT OUT" in line
               for line in err), captured.err
    assert any(line.startswith("note: content LoRA:") and "not recognised" in line for line in err), captured.err
    assert any(line.startswith("note: style LoRA:") and "scale 1" in line for line in err), captured.err


def test_errors_are_one_line_and_exit_non_zero(tmp_path):
    bogus = tmp_path / "style.ckpt"
    bogus.write_bytes(b"\x80\x02}q\x00.")
    content = write_lora(tmp_path / "c.safetensors", sample_lora(rank=2, seed=0))
    proc = subprocess.run([sys.executable, "-m", "hypernet", "merge", str(content), str(bogus), "-o",
                           str(tmp_path / "o.safetensors"), "--method", "sum"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "style.ckpt" in proc.stderr and "pickle" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "o.safetensors").exists()


def test_merge_refuses_an_sd15_style_lora(tmp_path, capsys):
    content = write_lora(tmp_path / "c.safetensors", sample_lora(rank=2, seed=0))
    style = write_lora(tmp_path / "sd15_style.safetensors", sd15_lora())
    assert main(["merge", str(content), str(style), "-o", str(tmp_path / "o.safetensors"), "--method", "sum"]) == 1
    err = capsys.readouterr().err
    assert "style LoRA" in err and "sd15_style.safetensors looks like SD1.5" in err


def test_inspect_command(sample_lora_pair, capsys):
    assert main(["inspect", str(sample_lora_pair[1]), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["base_family"] == "sdxl" and info["ranks"] == {"16": info["layers"]} == {"16": 40}
    assert info["key_layouts"] == {"kohya": 3 * info["layers"]}
    assert main(["inspect", str(sample_lora_pair[1])]) == 0
    assert "layers_per_block:" in capsys.readouterr().out


@pytest.mark.slow  # the command always builds a full-size SDXL pair (no size option)
def test_bench_command_reports_the_figures(capsys):
    assert main(["bench", "--rank", "2", "--repeat", "1", "--json"]) == 0
    figures = json.loads(capsys.readouterr().out)
    assert figures["matrices"] == 280
    assert figures["max_coefficient_diff"] < 1e-4
    assert figures["dense_over_factored"] > 0 and figures["write_s"] > 0
    # the arithmetic of the factored pass, counted by hand: SDXL has 40 of these layers at width
    # 640 and 240 at 1280 (all square); ranks 2 + 2; H's hidden size 128
    flops = sum(n * (2 * 128 * w * 4 + 2 * 128 * 4 * w + 4 * 128 * w) for n, w in ((40, 640), (240, 1280)))
    assert figures["factored_GFLOP"] == pytest.approx(flops / 1e9)
    assert figures["stacked_s"] > 0 and figures["matmul_GFLOPs"] > 0 and 0 < figures["share_of_matmul_rate"] <= figures["share_of_matmul_rate_best"]


def test_help_lists_every_command(capsys):
    # In-process: `python -m hypernet` itself is run by test_errors_are_one_line_and_exit_non_zero.
    with pytest.raises(SystemExit) as exited:
        main(["--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    for command in ("merge", "inspect", "convert-hypernet", "bench"):
        assert command in out


def test_dora_is_refused_unless_the_approximation_is_asked_for_and_then_said_everywhere(tmp_path, capsys):
    """A merge of files has no base weight for DoRA's magnitude: one clear error, nothing written;
    with --dora drop-magnitude the note is CLI output and the file's metadata says it too."""
    import torch
    from safetensors import safe_open

    shapes = {"middle_block.1.transformer_blocks.0.attn1.to_q": (1280, 1280)}
    dora_sd = synthetic.to_state_dict(synthetic.random_factors(shapes, 4, 0), alpha=4.0)
    dora_sd["lora_unet_middle_block_1_transformer_blocks_0_attn1_to_q.dora_scale"] = torch.rand(1280, 1) + 0.5
    content = write_lora(tmp_path / "dora.safetensors", dora_sd)
    style = write_lora(tmp_path / "s.safetensors", synthetic.to_state_dict(synthetic.random_factors(shapes, 4, 1)))
    out = tmp_path / "o.safetensors"
    assert main(["merge", str(content), str(style), "-o", str(out), "--method", "sum"]) == 1
    err = capsys.readouterr().err
    assert "error: content LoRA" in err and "1 layer(s) are DoRA" in err and "--dora drop-magnitude" in err
    assert not out.exists()
    assert main(["merge", str(content), str(style), "-o", str(out), "--method", "sum", "--dora", "drop-magnitude"]) == 0
    err = capsys.readouterr().err
    assert any(line.startswith("note: 1 DoRA layer(s) merged WITHOUT their magnitude") for line in err.splitlines()), err
    with safe_open(str(out), "pt") as f:
        assert "WITHOUT their magnitude" in f.metadata()["lorarar.dora"]
