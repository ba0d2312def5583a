"""The benchmark scripts run and restore what they change (their figures are read by people, not asserted)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from hypernet.methods import lorarar_cpu

SCRIPTS = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_coefficient_pass_bench_prints_every_arrangement_and_restores_the_defaults(capsys, random_hypernet_pth):
    bench = _load("bench_coefficient_pass")
    defaults = (lorarar_cpu.CHUNK, lorarar_cpu.BLOCK)
    assert bench.main(["--rounds", "1", "--arrangements", "2/1,16/4", "--hypernet", str(random_hypernet_pth)]) == 0
    out = capsys.readouterr().out
    assert "280 matrices" in out
    for label in ("before (batches of 4, stacked)", "stacked per group", "buffered 2/1", "buffered 16/4 (shipped)"):
        assert f"{label} " in out and "share of matmul rate: median" in out.split(label)[1].splitlines()[0]
    assert (lorarar_cpu.CHUNK, lorarar_cpu.BLOCK) == defaults


def test_coefficient_pass_bench_refuses_a_malformed_arrangement(capsys):
    bench = _load("bench_coefficient_pass")
    for bad in ("16", "16/0", "a/b", "16/4/2"):
        with pytest.raises(SystemExit) as exited:
            bench.main(["--arrangements", bad])
        assert exited.value.code == 2
        assert "--arrangements: expected chunk/block pairs" in capsys.readouterr().err


def test_gpu_check_refuses_to_start_without_a_comfyui_or_a_gpu(capsys, monkeypatch):
    """benchmarks/gpu_check.py: its CPU dry run is a real-ComfyUI run (tests/integration, slow
    tier through COMFYUI_PATH); here what it answers a user who calls it wrongly."""
    check = _load("gpu_check")
    monkeypatch.delenv("COMFYUI_PATH", raising=False)
    with pytest.raises(SystemExit) as exited:
        check.main(["--dry-run"])
    assert exited.value.code == 2 and "set COMFYUI_PATH" in capsys.readouterr().err
    import torch

    if not torch.cuda.is_available():
        monkeypatch.setenv("COMFYUI_PATH", "/nowhere")
        with pytest.raises(SystemExit) as exited:
            check.main([])
        assert exited.value.code == 2 and "no CUDA device: run with --dry-run" in capsys.readouterr().err


def test_gpu_check_comparison_counts_roundings_of_the_storage_dtype():
    """The check passes a weight one fp16 rounding off base + ΔW and fails one that is not (a
    missed patch, or a K-LoRA layer on the wrong side)."""
    import torch

    from hypernet.merged import MergedLayer, MergedLora, MergeReport, Side

    check = _load("gpu_check")
    name = "input_blocks.4.1.transformer_blocks.0.attn1.to_q"
    gen = torch.Generator().manual_seed(0)
    up, down = torch.randn(64, 4, generator=gen), torch.randn(4, 64, generator=gen)
    up2, down2 = torch.randn(64, 4, generator=gen), torch.randn(4, 64, generator=gen)
    merged = MergedLora({name: MergedLayer(Side(up, down, 0.01), Side(up2, down2, 0.01))}, MergeReport("k-lora"),
                        switch_points={name: 0.5})
    base = {f"unet.{name}.weight": (torch.randn(64, 64, generator=gen) * 0.05).half().float()}
    rounded = {p: (base[f"unet.{name}.weight"] + merged.delta_at(name, p)).half().float() for p in (0.2, 0.8)}
    good = check.compare([(p, {name: w}) for p, w in rounded.items()], merged, base, "fp16")
    assert good["ok"] and good["worst_in_roundings"] <= 1.0 and good["style_side_judged"] == 1
    swapped = check.compare([(0.2, {name: rounded[0.8]}), (0.8, {name: rounded[0.2]})], merged, base, "fp16")
    assert not swapped["ok"] and swapped["worst_in_roundings"] > 10
    unpatched = check.compare([(0.2, {name: base[f"unet.{name}.weight"]})], merged, base, "fp16")
    assert not unpatched["ok"]
    assert check.compare([(0.2, {})], merged, base, "fp16") == {"ok": False, "why": f"layer {name} not recorded"}


@pytest.mark.slow
def test_families_bench_prints_sdxl_and_flux_side_by_side(capsys):
    bench = _load("bench_families")
    assert bench.main(["--rounds", "1", "--cases", "sdxl-r64-kohya,flux1-r16-kohya"]) == 0
    out = capsys.readouterr().out
    assert "sdxl-r64-kohya" in out and "flux1-r16-kohya" in out and "vs SDXL" in out and "vs files" in out
    assert "warm +" in out
    row = next(line for line in out.splitlines() if line.startswith("flux1-r16-kohya")).split()
    cold, warm = float(row[-4].removesuffix("MB")), float(row[-2].removesuffix("MB"))
    assert 0 < warm <= cold + 5  # the warm process does not pay the one-time set-up again
