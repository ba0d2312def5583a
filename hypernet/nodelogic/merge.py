"""Logic of the merge node: the library's `merge` with an identity cache, so changing only the
strengths never runs a method again; the node's method settings; the patch plan (how the merged
result reaches `comfy.sd.load_lora_for_models` cheaply) and, for K-LoRA, the switch plan (which
layers change their patch during sampling, and when); the merged LORA_MODEL output; the plot."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from .. import naming
from ..errors import LoraRarError
from ..merge import DORA_EXACT_IN_COMFYUI, merge, method_spec, widgets
from ..merged import CONTENT, STYLE, MergedLayer, MergedLora, restrict_rows
from ..model import HyperNetwork
from ..progress import Progress
from . import plot
from .cache import IdentityCache
from .lazy import LazyMergedLora, MergeProvenance
from .lora import lora_file_of, name_of
from .switching import SwitchTimeline  # noqa: F401  (re-exported: its old home)

log = logging.getLogger(__name__)


# Strength-free merges by the identity of (content, style, hypernetwork) and the method with its
# parameters. Four entries: the side-by-side workflow runs one pair through every method.
_MERGES = IdentityCache(size=4)

# The node's method-specific inputs: widget name → (method, library parameter) — from the
# method registry (hypernet/merge.py), which also gives their order, defaults and tooltips.
NODE_PARAMS = {param.widget.name: (method, name) for method, name, param in widgets()}


def node_params(method: str, inputs: Mapping[str, Any], device: str | None = None) -> dict[str, Any]:
    """The chosen method's parameters from the node's widgets (and `device`, ComfyUI's compute
    device, for the settings that take it). Only that method's: changing another method's widget
    must not rerun (or re-key) this merge. np_rank 0 means "all"."""
    params = {}
    for owner, name, param in widgets():
        value = inputs.get(param.widget.name)
        if owner == method and value is not None:
            params[name] = param.widget.to_param(value) if param.widget.to_param else value
    if device is not None:
        params.update({name: device for name, param in method_spec(method).params.items() if param.device})
    return params


def run_merge(content_sd: dict, style_sd: dict, hypernet: HyperNetwork | None,
              content_strength: float, style_strength: float, method: str,
              params: Mapping[str, Any] | None = None, progress: Progress | None = None,
              model_family: str | None = None) -> MergedLora:
    """Everything the merge node computes, before touching the model. The family comes from the
    two LoRAs (and the hypernetwork); `model_family`, the connected MODEL's, narrows it."""
    content = lora_file_of(content_sd, "content LoRA")
    style = lora_file_of(style_sd, "style LoRA")
    # the node patches DoRA layers with ComfyUI's own DoRA, which has the model's weights
    return merge(content, style, hypernet, content_strength, style_strength, method, params=params,
                 expected_family=model_family, progress=progress, cache=_MERGES, dora=DORA_EXACT_IN_COMFYUI)


class NotOneLora(dict):
    """The LORA_MODEL output of a merge that is not one LoRA (K-LoRA): every read raises the
    library's explanation naming the method, so core's LoRA nodes, Save Merged LoRA or another
    merge say why instead of loading or writing something that is not the merge."""

    def __init__(self, merged: MergedLora):
        super().__init__()
        try:
            merged._require_single_lora("merged_lora")
        except LoraRarError as exc:
            self._message = str(exc)
        else:  # only built for merges that are not one LoRA
            raise ValueError("NotOneLora needs a merge that switches LoRAs during sampling")
        self.provenance = None

    @property
    def unsaveable_reason(self) -> str:
        """What Save Merged LoRA shows instead of writing (see nodelogic.lora.unsaveable_reason)."""
        return self._message.removeprefix("merged_lora: ")

    def _refuse(self, *args, **kwargs):
        raise LoraRarError(self._message)

    __len__ = __iter__ = __contains__ = __getitem__ = keys = values = items = get = copy = _refuse
    __setitem__ = __delitem__ = update = pop = setdefault = __or__ = __ror__ = _refuse

    def __bool__(self) -> bool:
        self._refuse()

    def __repr__(self) -> str:
        return "<merged_lora of a merge that is not one LoRA>"

    def __reduce_ex__(self, protocol):
        self._refuse()


def merged_lora_output(merged: MergedLora, content_sd: dict, style_sd: dict,
                       hypernet: HyperNetwork | None) -> dict:
    """The merged LoRA for the LORA_MODEL output: lazy, with provenance for saving — or, for a
    merge that switches LoRAs during sampling, a dict that explains why there is none."""
    if merged.switch_points:
        return NotOneLora(merged)
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
    as two stacked LoraLoaders, and never one load_lora_for_models call per layer (4.1 s for SDXL's 722 layers; docs/nodes.md).
    A K-LoRA merge has its own plan (`switch_plan`).
    """
    sides = merged.side_state_dicts(include_text_encoders)
    return [(sides[role], merged.strength(role)) for role in (CONTENT, STYLE)
            if sides[role] and merged.strength(role) != 0]


def patch_plan_of(merged: MergedLora, names: list[str], include_text_encoders: bool = True):
    """`patch_plan` of only the layers `names` (those a one-patch-per-weight plan cannot carry:
    sides without a low-rank form)."""
    view = dataclasses.replace(merged, layers={n: merged.layers[n] for n in names}, _shared={})
    return patch_plan(view, include_text_encoders)


@dataclass
class SwitchPlan:
    """How a K-LoRA merge reaches ComfyUI. `static`: (kohya dict, strength) patched once, like any
    merge — the summed layers, and the attention projections whose switch point lies outside
    sampling (p_l ≤ 0: the style side only; p_l ≥ 1: the content side only). `content`/`style`:
    kohya dicts of the layers that switch during sampling (0 < p_l < 1), one side each, and
    `points` their switch points by kohya module name. Strengths apply to every patch."""

    static: list[tuple[dict[str, torch.Tensor], float]]
    content: dict[str, torch.Tensor]
    style: dict[str, torch.Tensor]
    points: dict[str, float]
    content_strength: float
    style_strength: float
    # kohya module → ((content Side, strength),), ((style Side, strength),) of each switching
    # layer — for backends that add the side in use at every cast (`merged.PreparedSides`)
    sides: dict[str, tuple[tuple, tuple]] = dataclasses.field(default_factory=dict)


def _sides_subset(merged: MergedLora, layers: dict[str, MergedLayer], include_text_encoders: bool) -> dict:
    """role → kohya dict of the given layers' sides (a single-LoRA view, so the library's one
    fold and export code is used)."""
    view = MergedLora(layers, merged.report, family=merged.family)
    return view.side_state_dicts(include_text_encoders)


def _split_rows(layer: MergedLayer, rows: tuple[int, int] | None) -> tuple[MergedLayer, MergedLayer]:
    """(the switching rows' layer, the other rows' layer) of a layer of which only `rows` switch;
    (the layer, an empty one) where all of it does. Cached on the layer (strength-free)."""
    if rows is None:
        return layer, MergedLayer()
    cached = getattr(layer, "_split", None)
    if cached is None or cached[0] != rows:
        start, stop = rows
        halves = tuple(MergedLayer(*(restrict_rows(side, start, stop, inside) if side is not None else None
                                     for side in (layer.content, layer.style)))
                       for inside in (True, False))
        cached = layer._split = (rows, halves)
    return cached[1]


def switch_plan(merged: MergedLora, include_text_encoders: bool = True) -> SwitchPlan:
    """The `SwitchPlan` of a merge with switch points (strength-free parts cached on the merge)."""
    key = ("switch_plan", include_text_encoders)
    if key not in merged._shared:
        fixed: dict[str, MergedLayer] = {}
        moving: dict[str, MergedLayer] = {}
        points: dict[str, float] = {}
        for name, layer in merged.layers.items():
            point = merged.switch_points.get(name)
            if point is None:
                fixed[name] = layer
                continue
            # where only some rows switch, the others are the sum at every step: a static patch
            inside, outside = _split_rows(layer, merged.switch_rows.get(name))
            if point <= 0:
                fixed[name] = MergedLayer(outside.content, layer.style)
            elif point >= 1:
                fixed[name] = MergedLayer(layer.content, outside.style)
            else:
                if outside.content is not None:
                    fixed[name] = outside
                moving[name] = inside
                points[naming.kohya_key(name, merged.family)] = point
        merged._shared[key] = (_sides_subset(merged, fixed, include_text_encoders),
                               _sides_subset(merged, moving, include_text_encoders), points)
    static, dynamic, points = merged._shared[key]
    sides = {}
    for name, point in merged.switch_points.items():
        if 0 < point < 1 and (include_text_encoders or not naming.is_text_encoder(name)):
            layer = _split_rows(merged.layers[name], merged.switch_rows.get(name))[0]
            sides[naming.kohya_key(name, merged.family)] = tuple(
                tuple((s, merged.strength(role)) for role, s in layer.sides() if role == wanted)
                for wanted in (CONTENT, STYLE))
    return SwitchPlan([(static[role], merged.strength(role)) for role in (CONTENT, STYLE)
                       if static[role] and merged.strength(role) != 0],
                      dynamic[CONTENT], dynamic[STYLE], points,
                      merged.content_strength, merged.style_strength, sides)


def report_text(merged: MergedLora) -> str:
    """The merge report as the node's `report` output shows it: the summary line, then each note
    (left-out layers, assumed alpha, …) on its own line — what a CLI user sees on stderr."""
    return "\n".join([merged.report.summary(), *merged.report.notes])


def plot_title(merged: MergedLora, content_name: str, style_name: str, hypernet_name: str) -> tuple[str, str]:
    report = merged.report
    title = f"LoRA.rar {report.method} merge" + (f" - {hypernet_name}" if hypernet_name else "")
    subtitle = (f"content {content_name or '?'} x{merged.content_strength:g}, style {style_name or '?'} "
                f"x{merged.style_strength:g}; {report.method_layers} matrices {report.method_label}, "
                f"{report.summed_layers} summed")
    left_out = sum(report.left_out.values())
    if left_out:  # the picture is what many users look at: it must not hide dropped layers
        subtitle += f"; {left_out} input layer(s) LEFT OUT (see report)"
    return title, subtitle


# Per-block (or per-layer) plot data of each merge, by identity of its coefficients, removed
# shares or switch points (the name is older than the non-coefficient plots).
_BLOCK_MEANS = IdentityCache(size=4)


def coefficient_image(merged: MergedLora, content_name: str, style_name: str, hypernet_name: str) -> torch.Tensor:
    """The merge node's IMAGE output, drawn for what the method did: LoRA.rar's mean coefficients
    per transformer block, NP-LoRA's removed share per block, K-LoRA's switch point per layer
    (the data cached per merge; only the subtitle changes with the strengths)."""
    title, subtitle = plot_title(merged, content_name, style_name, hypernet_name)
    if merged.switch_points:
        switches = _BLOCK_MEANS.get_or_compute((merged.switch_points,), lambda: plot.layer_switches(merged.switch_points))
        subtitle = (f"content {content_name or '?'} x{merged.content_strength:g}, style {style_name or '?'} "
                    f"x{merged.style_strength:g}; {len(switches)} attention projections: "
                    f"{sum(0 < s.point < 1 for s in switches)} switch during sampling, "
                    f"{sum(s.point <= 0 for s in switches)} style throughout, "
                    f"{sum(s.point >= 1 for s in switches)} content throughout")
        return plot.image_to_tensor(plot.switch_plot(switches, title, subtitle))
    if merged.layer_values:
        values = _BLOCK_MEANS.get_or_compute((merged.layer_values,), lambda: plot.block_values(merged.layer_values))
        return plot.image_to_tensor(plot.projection_plot(values, title, subtitle))
    contribution = merged.contribution  # LoRA.rar: H(0) marks and one line on what H contributed
    means = _BLOCK_MEANS.get_or_compute((merged.coefficients,), lambda: plot.block_means(
        merged.coefficients, plot.h0_references(contribution)))
    caption = contribution.short_summary() if contribution is not None else ""
    return plot.image_to_tensor(plot.coefficient_plot(means, title, subtitle, caption=caption))
