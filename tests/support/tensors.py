"""What a test asks of nested containers of tensors (a weight adapter's `weights`, a packed factor)."""

from __future__ import annotations

import torch


def tensors_in(value) -> list[torch.Tensor]:
    """Every tensor inside nested tuples and lists, in order; other values are skipped."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in tensors_in(v)]
    return []
