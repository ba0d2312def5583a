"""Shared fixtures: synthetic SDXL LoRAs written to tmp files, and the official checkpoints."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from hypernet.tooling import synthetic
from tests.support.files import OFFICIAL_SDXL, write_lora
from tests.support.loras import sample_lora


@pytest.fixture(scope="session")
def official_sdxl_path() -> Path:
    if not OFFICIAL_SDXL.is_file():
        pytest.skip(f"official SDXL hypernetwork not found at {OFFICIAL_SDXL} (third-party file, never in the "
                    "repo; set LORARAR_OFFICIAL_HYPERNETS to the folder that holds it)")
    return OFFICIAL_SDXL


@pytest.fixture(scope="session")
def lora_pair(tmp_path_factory) -> tuple[Path, Path]:
    """A full SDXL-shaped kohya pair (all 722 UNet targets + text-encoder layers), different
    ranks and alphas, fp16 like most published LoRAs. Costly to write and to merge: for the
    slow tier; the default tier uses `sample_lora_pair`."""
    folder = tmp_path_factory.mktemp("loras")
    content = write_lora(folder / "subject.safetensors",
                         synthetic.sdxl_lora(rank=8, seed=1, alpha=4, dtype=torch.float16),
                         {"ss_network_dim": "8", "ss_output_name": "subject"})
    style = write_lora(folder / "style.safetensors",
                       synthetic.sdxl_lora(rank=16, seed=2, alpha=16, dtype=torch.float16))
    return content, style


@pytest.fixture(scope="session")
def sample_lora_pair(tmp_path_factory) -> tuple[Path, Path]:
    """`lora_pair` on tests/support/loras.sdxl_sample_shapes (a whole 640-wide block, 1280-wide
    middle-block layers, the UNet's last block, text-encoder layers): same ranks, alphas, dtype
    and metadata, a few per cent of the size."""
    folder = tmp_path_factory.mktemp("sample_loras")
    content = write_lora(folder / "subject.safetensors", sample_lora(rank=8, seed=1, alpha=4, dtype=torch.float16),
                         {"ss_network_dim": "8", "ss_output_name": "subject"})
    style = write_lora(folder / "style.safetensors", sample_lora(rank=16, seed=2, alpha=16, dtype=torch.float16))
    return content, style


@pytest.fixture(scope="session")
def random_hypernet_pth(tmp_path_factory) -> Path:
    """A randomly initialised hypernetwork in the official .pth layout."""
    gen = torch.Generator().manual_seed(7)
    sd = {
        "input_1.weight": torch.randn(128, 1280, generator=gen) * 0.05, "input_1.bias": torch.randn(128, generator=gen) * 0.05,
        "input_2.weight": torch.randn(128, 2560, generator=gen) * 0.05, "input_2.bias": torch.randn(128, generator=gen) * 0.05,
        "output.1.weight": torch.randn(2, 128, generator=gen) * 0.1, "output.1.bias": torch.ones(2),
    }
    path = tmp_path_factory.mktemp("hypernet") / "random_hypernet.pth"
    torch.save(sd, path)
    return path


# ---------------------------------------------------------------------------------------------
# Test tiers: tests marked `slow` (full-size SDXL shapes, DDP, the testbed's heavier runs, real
# ComfyUI servers) stay out of the default `python -m pytest`, which must answer in about a
# minute. `--run-slow` (or any explicit `-m` expression, e.g. `-m slow`) brings them back;
# `.ci/run` runs both tiers.

def pytest_configure(config):
    # One intra-op thread for the whole run (unless OMP_NUM_THREADS says otherwise). The tests run
    # many small and mid-sized kernels; with two threads on a 2-core machine where another process
    # holds a core, every kernel waits for the descheduled thread: tests/test_merge.py with
    # tests/test_k_lora.py took 91 s of CPU with two threads and 12 s with one (2026-12-02).
    # Subprocesses a test starts are not affected.
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true", default=False,
                     help="also run the tests marked slow (full-size shapes, DDP, real ComfyUI, browser)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--run-slow") or config.option.markexpr:
        return
    slow = [item for item in items if item.get_closest_marker("slow")]
    if slow:
        config.hook.pytest_deselected(items=slow)
        items[:] = [item for item in items if not item.get_closest_marker("slow")]
