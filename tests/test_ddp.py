"""Two-process DistributedDataParallel training (gloo, CPU) equals one process with the same pairs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hypernet.model import load_hypernet
from hypernet.training.manifest import load_manifest
from hypernet.training.testmodel import tiny_base
from hypernet.training.trainer import Trainer, TrainSettings
from tests.support.training import make_dataset, one_thread  # noqa: F401 - fixture

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # two fresh interpreters with torch.distributed: ~15 s on a busy 2-core machine
@pytest.mark.usefixtures("one_thread")
def test_two_process_gloo_matches_one_process(tmp_path):
    manifest_path = make_dataset(tmp_path / "data")
    steps, pairs, hidden, seed = 2, 2, 8, 5
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "hypernet", "train", str(manifest_path), "--base", "tiny", "--out", str(tmp_path / "ddp"),
           "--device", "cpu", "--steps", str(steps), "--pairs-per-step", str(pairs), "--hidden", str(hidden),
           "--seed", str(seed), "--checkpoint-every", "0", "--validate-every", "0"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ddp = load_hypernet(tmp_path / "ddp" / "hypernet.safetensors")
    assert ddp.config.extra["processes"] == "2"

    single = Trainer(tiny_base(), load_manifest(manifest_path),
                     TrainSettings(steps=steps, pairs_per_step=pairs, hidden=hidden, seed=seed,
                                   checkpoint_every=0, validate_every=0), tmp_path / "single").run()
    reference = single.hypernet.state_dict()
    moved = False
    for key, value in ddp.state_dict().items():
        # same update up to float summation order (all-reduce vs. local accumulation)
        torch.testing.assert_close(value, reference[key].float(), rtol=1e-5, atol=1e-6)
    # and training did move H away from its (seeded, identical) initialisation
    from hypernet.training.trainer import build_hypernet

    init = build_hypernet((32, 64), TrainSettings(hidden=hidden, seed=seed), "test").state_dict()
    moved = any(not torch.allclose(init[k], v) for k, v in ddp.state_dict().items())
    assert moved
    # each step's two pairs were split over the two ranks: the log lists both
    log_lines = (tmp_path / "ddp" / "train_log.jsonl").read_text().splitlines()
    assert len([line for line in log_lines if '"kind": "train"' in line]) == steps
