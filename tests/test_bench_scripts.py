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
