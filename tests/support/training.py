"""Helpers for the training tests: a tiny data set (LoRAs, images, manifest) on disk."""

from __future__ import annotations

import pytest
import torch

from hypernet.training.testmodel import write_dataset as make_dataset  # noqa: F401 - re-export


@pytest.fixture
def one_thread():
    """The training tests run many tiny kernels: one intra-op thread is several times faster than
    two on a busy 2-core machine (thread hand-off dominates). Import this into a test module."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
