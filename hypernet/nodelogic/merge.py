"""Logic of the merge node: coefficients cached by the identity of (content, style,
hypernetwork), so changing only the strengths never runs the hypernetwork again; the patch plan
(how the merged result reaches `comfy.sd.load_lora_for_models` cheaply); the coefficient plot."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .. import naming
from ..errors import HypernetError, LoraRarError
from ..lora import LoraFile
from ..merge import METHODS, Coefficients, MergedLora, assemble, compute_coefficients
from ..model import HyperNetwork
from . import plot
from .cache import IdentityCache
from .lazy import LazyMergedLora, MergeProvenance
from .lora import check_sdxl, lora_file_of, name_of

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]


_COEFFICIENTS = IdentityCache()


def merge_coefficients(content: LoraFile, style: LoraFile, hypernet: HyperNetwork,
                       progress: Progress | None = None) -> tuple[Coefficients, int]:
    """compute_coefficients, cached by the identity of its three inputs (the strengths do not
    enter: H sees the LoRAs as their files define them, DESIGN §10)."""
    return _COEFFICIENTS.get_or_compute(
        (content, style, hypernet), lambda: compute_coefficients(content, style, hypernet, "error", progress))


_NO_COEFFICIENTS: Coefficients = {}  # never mutated


@dataclass
class MergeResult:
    merged: MergedLora
    content: LoraFile
    style: LoraFile
    coefficients: Coefficients


def run_merge(content_sd: dict, style_sd: dict, hypernet: HyperNetwork | None,
              content_strength: float, style_strength: float, method: str,
              progress: Progress | None = None) -> MergeResult:
    """Everything the merge node computes, before touching the model."""
    if method not in METHODS:
        raise LoraRarError(f"method: expected one of {', '.join(METHODS)}, got {method!r}")
    if method == "lorarar" and hypernet is None:
        raise HypernetError("hypernetwork: method 'lorarar' needs a hypernetwork; connect "
                            "'Load Hypernetwork (LoRA.rar)' or choose method 'sum'")
    content = lora_file_of(content_sd, "content LoRA")
    style = lora_file_of(style_sd, "style LoRA")
    check_sdxl(content, "content LoRA", hypernet if method == "lorarar" else None)
    check_sdxl(style, "style LoRA", hypernet if method == "lorarar" else None)
    coefficients: Coefficients = _NO_COEFFICIENTS  # one shared object: caches keyed on it hit for "sum"
    if method == "lorarar":
        coefficients, _ = merge_coefficients(content, style, hypernet, progress)  # widths: 'error', never a fallback
    merged = assemble(content, style, coefficients, content_strength, style_strength, method)
    log.info("LoRA.rar merge: %s", merged.report.summary())
    return MergeResult(merged, content, style, coefficients)


def merged_lora_output(result: MergeResult, content_sd: dict, style_sd: dict,
                       hypernet: HyperNetwork | None) -> LazyMergedLora:
    """The merged LoRA for the LORA_MODEL output: lazy, with provenance for saving."""
    provenance = MergeProvenance(
        result.merged,
        content_name=name_of(content_sd, ""), content_path=getattr(content_sd, "path", None),
        style_name=name_of(style_sd, ""), style_path=getattr(style_sd, "path", None),
        hypernet_name=hypernet.config.name if hypernet is not None else "",
        hypernet_path=getattr(hypernet, "source_path", None) if hypernet is not None else None)
    return LazyMergedLora.from_merged(result.merged, provenance)


_SCALED_DOWNS = IdentityCache()


def _scaled_downs(content: LoraFile, style: LoraFile, coefficients: Coefficients) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """down · diag(m) for both sides of every hypernetwork-merged layer, float32 (ComfyUI
    computes patches in float32 anyway, so the patched weights match the library's ΔW).

    Independent of the strengths, so cached with the coefficients. Layers of equal shape are
    scaled in one batched multiply: a few large tensor ops instead of ~1100 small ones (each
    small op pays thread start-up; on a busy machine that dominated this step)."""

    def build() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        groups: dict[tuple, list[str]] = {}
        for name in coefficients:
            c, s = content.layers.get(name), style.layers.get(name)
            if c is None or s is None or not (c.is_low_rank and s.is_low_rank) or c.mid is not None \
                    or s.mid is not None or c.down.dim() != 2 or s.down.dim() != 2:
                continue  # dense layers never reach the patch plan's low-rank path
            groups.setdefault((tuple(c.down.shape), c.down.dtype, tuple(s.down.shape), s.down.dtype), []).append(name)
        scaled: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        with torch.no_grad():
            for names in groups.values():
                sides = []
                for index, lora in enumerate((content, style)):
                    downs = torch.stack([lora.layers[n].down for n in names]).float()
                    columns = torch.stack([coefficients[n][index] for n in names]).float()
                    sides.append(downs.mul_(columns[:, None, :]).unbind(0))
                scaled.update((n, (sides[0][i], sides[1][i])) for i, n in enumerate(names))
        return scaled

    return _SCALED_DOWNS.get_or_compute((content, style, coefficients), build)


_SIDE_DICTS = IdentityCache()


def _side_state_dicts(result: MergeResult, include_text_encoders: bool) -> tuple[dict, dict]:
    """Content-side and style-side kohya dicts of the plan's low-rank layers. They hold no
    strength (that is the patch strength), so a strength change reuses them as they are."""
    merged, coefficients = result.merged, result.coefficients

    def build() -> tuple[dict, dict]:
        scaled = _scaled_downs(result.content, result.style, coefficients) if coefficients else {}
        sides: tuple[dict, dict] = ({}, {})
        for name, layer in merged.layers.items():
            if layer.diff is not None or (not include_text_encoders and naming.is_text_encoder(name)):
                continue
            key = naming.ldm_to_kohya_key(name)
            columns = coefficients.get(name)
            for index, lora in enumerate((result.content, result.style)):
                source = lora.layers.get(name)
                if source is None:
                    continue
                down = source.down
                if columns is not None:
                    down = scaled[name][index] if name in scaled else \
                        down.float() * columns[index].reshape(1, -1, *([1] * (down.dim() - 2)))
                sides[index][f"{key}.lora_up.weight"] = source.up
                sides[index][f"{key}.lora_down.weight"] = down
                if source.alpha is not None:
                    sides[index][f"{key}.alpha"] = torch.tensor(float(source.alpha))
        return sides

    # Which layers are dense depends on the LoRAs only, never on the strengths.
    return _SIDE_DICTS.get_or_compute((result.content, result.style, coefficients, include_text_encoders), build)


def patch_plan(result: MergeResult, include_text_encoders: bool = True) -> list[tuple[dict[str, torch.Tensor], float]]:
    """(kohya state dict, strength) pairs whose patches add up to exactly the merged ΔW.

    Concatenating both sides into one rank-(r_c + r_s) LoRA would copy every factor of both
    files. ComfyUI can hold several patches per weight and adds them when it patches, so each
    side is given as its own LoRA (its original tensors, no copy; the hypernetwork's columns
    folded into `down` for the ~280 merged matrices) at its strength — the same work as two
    stacked LoraLoaders. Layers without a low-rank form go in a third dict as `.diff` (strength
    already inside). A handful of load_lora_for_models calls, never one per layer (DESIGN §8).
    """
    merged = result.merged
    content_sd, style_sd = _side_state_dicts(result, include_text_encoders)
    plan = [(sd, strength) for sd, strength in ((content_sd, merged.content_strength), (style_sd, merged.style_strength))
            if sd and strength != 0]
    dense = {f"{naming.ldm_to_kohya_key(name)}.diff": layer.diff for name, layer in merged.layers.items()
             if layer.diff is not None and (include_text_encoders or not naming.is_text_encoder(name))}
    if dense:
        plan.append((dense, 1.0))
    return plan


def plot_title(result: MergeResult, content_name: str, style_name: str, hypernet_name: str) -> tuple[str, str]:
    merged = result.merged
    title = f"LoRA.rar {merged.report.method} merge" + (f" - {hypernet_name}" if hypernet_name else "")
    subtitle = (f"content {content_name or '?'} x{merged.content_strength:g}, style {style_name or '?'} "
                f"x{merged.style_strength:g}; {merged.report.hypernet_layers} matrices by the "
                f"hypernetwork, {merged.report.summed_layers} summed")
    return title, subtitle


_BLOCK_MEANS = IdentityCache()


def coefficient_image(result: MergeResult, content_name: str, style_name: str, hypernet_name: str) -> torch.Tensor:
    """The merge node's IMAGE output: mean coefficients per transformer block (cached per
    coefficient set; only the subtitle changes with the strengths)."""
    means = _BLOCK_MEANS.get_or_compute((result.coefficients,), lambda: plot.block_means(result.coefficients))
    title, subtitle = plot_title(result, content_name, style_name, hypernet_name)
    return plot.image_to_tensor(plot.coefficient_plot(means, title, subtitle))

