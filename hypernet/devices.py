"""Torch devices named by users ('cpu', 'cuda', 'cuda:1', 'mps', …), checked once with one clear error."""

from __future__ import annotations

import contextlib

import torch

from .errors import LoraRarError


def resolve_device(device: str | None, owner: str) -> torch.device:
    """The torch device `device` names (None: the CPU); `owner` names the setting in the error."""
    try:
        resolved = torch.device(device or "cpu")
        torch.empty(1, device=resolved)  # a name torch parses may still be a device this machine lacks
    except (RuntimeError, AssertionError, TypeError) as exc:
        raise LoraRarError(f"{owner}: device must be a torch device this machine has (cpu, cuda, …), "
                           f"got {device!r}: {exc}") from None
    return resolved


@contextlib.contextmanager
def full_float32_matmuls(device: torch.device):
    """float32 products at full precision on `device` while inside (no TF32 on CUDA, which a
    host application may have switched on globally): results must equal the CPU's to ~1e-6."""
    if device.type != "cuda":
        yield
        return
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)
