"""A fixed-seed mutation run over real-shaped seed files of every key layout, model family, adapter kind and
both hypernetwork formats: every case must read fine or fail with a LoraRarError, in bounded
time and memory. (benchmarks/fuzz_reader.py runs the same with >= 10,000 cases.)"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# A fresh interpreter (torch imported) starts near 250 MB; one expanding a 427 kB LoKr used 2.7 GB.
PEAK_MB = 1200


# Starting the interpreter and writing the seed files costs ~2.5 s of CPU, each case ~10 ms:
# the default tier runs 150 cases (about 20 read fine), the slow tier 1500.
@pytest.mark.parametrize("cases", [150, pytest.param(1500, marks=pytest.mark.slow)])
def test_mutated_files_only_read_or_fail_cleanly(cases):
    proc = subprocess.run([sys.executable, "-m", "hypernet.tooling.fuzzing", "--cases", str(cases), "--seed", "20261",
                           "--json"], cwd=REPO, capture_output=True, text=True, timeout=300)
    summary = json.loads(proc.stdout)
    assert summary["cases"] == cases
    assert summary["other_exceptions"] == 0, summary["failures"]
    assert summary["ok"] + summary["clean_errors"] == cases
    # both outcomes occur, i.e. the mutations reach past the first check
    assert summary["ok"] > 10 and summary["clean_errors"] > cases / 2
    assert summary["peak_rss_mb"] < PEAK_MB, summary
    # CPU time: wall time on a shared 2-core machine also counts other people's processes
    assert summary["slowest_case_cpu_s"] < 5, summary["slowest_case_cpu"]
    assert proc.returncode == 0
