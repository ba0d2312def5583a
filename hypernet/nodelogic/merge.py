"""Logic of the merge node: the library's `merge` with an identity cache, so changing only the
strengths never runs a method again; the patch plan (how the merged result reaches
`comfy.sd.load_lora_for_models` cheaply); the merged LORA_MODEL output; the coefficient plot."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

import torch

from ..merge import merge
from ..merged import CONTENT, STYLE, MergedLora
from ..model import HyperNetwork
from . import plot
from .cache import IdentityCache
from .lazy import LazyMergedLora, MergeProvenance
from .lora import lora_file_of, name_of

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]

# Strength-free merges by the identity of (content, style, hypernetwork) and the method with its
# parameters. Four entries: the side-by-side workflow runs one pair through every method.
_MERGES = IdentityCache(size=4)


def run_merge(content_sd: dict, style_sd: dict, hypernet: HyperNetwork | None,
              content_strength: float, style_strength: float, method: str,
              params: Mapping[str, Any] | None = None, progress: Progress | None = None) -> MergedLora:
    """Everything the merge node computes, before touching the model."""
    content = lora_file_of(content_sd, "content LoRA")
    style = lora_file_of(style_sd, "style LoRA")
    return merge(content, style, hypernet, content_strength, style_strength, method, params=params,
                 expected_family="sdxl", progress=progress, cache=_MERGES)


def merged_lora_output(merged: MergedLora, content_sd: dict, style_sd: dict,
                       hypernet: HyperNetwork | None) -> LazyMergedLora:
    """The merged LoRA for the LORA_MODEL output: lazy, with provenance for saving."""
    provenance = MergeProvenance(
        merged,
        content_name=name_of(content_sd, ""), content_path=getattr(content_sd, "path", None),
        style_name=name_of(style_sd, ""), style_path=getattr(style_sd, "path", None),
        hypernet_name=hypernet.config.name if hypernet is not None else "",
        hypernet_path=getattr(hypernet, "source_path", None) if hypernet is not None else None)
    return LazyMergedLora.from_merged(merged, provenance)


def patch_plan(merged: MergedLora, include_text_encoders: bool = True) -> list[tuple[dict[str, torch.Tensor], float]]:
    """(kohya state dict, strength) pairs whose patches add up to exactly the merged ΔW.

    Concatenating both sides into one rank-(r_c + r_s) LoRA would copy every factor of both
    files. ComfyUI can hold several patches per weight and adds them when it patches, so each
    side is given as its own LoRA (`MergedLora.side_state_dicts`: its original tensors, the
    method's columns folded into `down`, dense layers as `.diff`) at its strength — the same work
    as two stacked LoraLoaders, and never one load_lora_for_models call per layer (DESIGN §8).
    """
    sides = merged.side_state_dicts(include_text_encoders)
    return [(sides[role], merged.strength(role)) for role in (CONTENT, STYLE)
            if sides[role] and merged.strength(role) != 0]


def plot_title(merged: MergedLora, content_name: str, style_name: str, hypernet_name: str) -> tuple[str, str]:
    report = merged.report
    title = f"LoRA.rar {report.method} merge" + (f" - {hypernet_name}" if hypernet_name else "")
    subtitle = (f"content {content_name or '?'} x{merged.content_strength:g}, style {style_name or '?'} "
                f"x{merged.style_strength:g}; {report.method_layers} matrices {report.method_label}, "
                f"{report.summed_layers} summed")
    return title, subtitle


_BLOCK_MEANS = IdentityCache()


def coefficient_image(merged: MergedLora, content_name: str, style_name: str, hypernet_name: str) -> torch.Tensor:
    """The merge node's IMAGE output: mean coefficients per transformer block (cached per
    coefficient set; only the subtitle changes with the strengths)."""
    means = _BLOCK_MEANS.get_or_compute((merged.coefficients,), lambda: plot.block_means(merged.coefficients))
    title, subtitle = plot_title(merged, content_name, style_name, hypernet_name)
    return plot.image_to_tensor(plot.coefficient_plot(means, title, subtitle))
