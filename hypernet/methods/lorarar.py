"""LoRA.rar (Shenaj et al., ICCV 2025): the hypernetwork predicts per-column merge coefficients.

Per target layer (`to_q`, `to_out.0` of attn1/attn2 by default) with updates ΔW_c and ΔW_s,
(m_c[j], m_s[j]) = H([ΔW_c[:, j]; ΔW_s[:, j]]) for every input column j, and the merged update is
ΔW_c·diag(m_c) + ΔW_s·diag(m_s); every other layer is summed (docs/methods.md). H sees the LoRAs as their
files define them (alpha/rank applied), never the strengths (docs/methods.md).

H's first layer is linear, so its pre-activation for all columns is computed from the factors
(`HyperNetwork.coefficients_factored`; on the CPU the same products in reused buffers,
`lorarar_cpu.group_coefficients`) — no out×in matrix for low-rank inputs (docs/cli.md, "How the merge is computed").

The same pass collects what the merge needs to say how much H reacted to the pair — |W1·x| per
column and the column forms of ΔW_c, ΔW_s — and `lorarar_merge` turns them into
`MergedLora.contribution` and report notes (`lorarar_diagnostics`, issue 17).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import torch

from .. import families, naming
from ..devices import full_float32_matmuls, resolve_device
from ..errors import HypernetError, LoraRarError
from ..lora import LoraFile, LoraLayer
from ..merged import Coefficients, MergedLora, assemble, check_same_shape
from ..model import HyperNetwork
from ..progress import Progress
from .lorarar_cpu import group_coefficients
from .lorarar_diagnostics import MEASURE_ROWS, column_forms, column_forms_dense, measure_contribution

WIDTH_POLICIES = ("error", "sum")


# A hypernetwork's targets name attention projections the way SDXL's modules do (`to_q`,
# `to_out.0`); in a family they are roles, which its data gives every weight.
TARGET_ROLES = {"to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "out", "to_out": "out"}


def is_hypernet_target(name: str, targets: tuple[str, ...], family: str | None = None) -> bool:
    """Whether H merges the layer: an attention weight (of the model, not a text encoder) with one
    of H's target roles. On a fused weight (Flux's `img_attn.qkv`) that holds a target role, H
    merges the whole weight — its columns are the input columns of q, k and v alike."""
    if naming.is_text_encoder(name):
        return False
    spec = families.get(family or "sdxl")
    if spec.attention_of(name) is None:
        return False
    wanted = {TARGET_ROLES.get(t, t) for t in targets}
    return bool(spec.roles_of(name) & wanted)


def _factored(layer: LoraLayer) -> bool:
    return layer.is_low_rank and layer.mid is None


def _stacked_factors(layers: list[LoraLayer], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale·up, down) of same-shape layers stacked to (L, out, r) and (L, r, in), float32, on
    `device` (the factors travel in their file dtype and are widened there)."""
    scales = torch.tensor([layer.scale for layer in layers], dtype=torch.float32).reshape(-1, 1, 1).to(device)
    ups = torch.stack([layer.up.reshape(layer.up.shape[0], -1).to(device, non_blocking=True) for layer in layers])
    downs = torch.stack([layer.down.reshape(layer.down.shape[0], -1).to(device, non_blocking=True) for layer in layers])
    return ups.float() * scales, downs.float()


def accelerator_group_coefficients(hypernet: HyperNetwork, contents: list[LoraLayer], styles: list[LoraLayer],
                                   device: torch.device, measure: bool = False) -> tuple[torch.Tensor, ...]:
    """(m_c, m_s) of layers of one shape and pair of ranks in one batched call of H on `device`;
    with `measure`, also their (layers, 4, in) measures (lorarar_diagnostics.MEASURE_ROWS)."""
    up_c, down_c = _stacked_factors(contents, device)
    up_s, down_s = _stacked_factors(styles, device)
    if not measure:
        return hypernet.coefficients_factored(up_c, down_c, up_s, down_s)
    m_c, m_s, norms = hypernet.coefficients_factored(up_c, down_c, up_s, down_s, input_norms=True)
    return m_c, m_s, torch.cat([norms[:, None], column_forms(up_c, down_c, up_s, down_s)], dim=1)


def shape_groups(content: LoraFile, style: LoraFile, names: list[str]) -> tuple[dict[tuple, list[str]], list[str]]:
    """`names` as groups that go through H together — factored layers of equal shapes, ranks and
    dtypes (SDXL's 280 fall into 2): on the CPU in reused buffers a chunk at a time (lorarar_cpu),
    elsewhere in one call — and the layers H has to see as dense ΔW."""
    groups: dict[tuple, list[str]] = {}
    dense: list[str] = []
    for name in names:
        c, s = content.layers[name], style.layers[name]
        if _factored(c) and _factored(s):
            groups.setdefault((c.shape[0], c.shape[1], c.rank, s.rank, c.dtype, s.dtype), []).append(name)
        else:
            dense.append(name)
    return groups, dense


@dataclass
class CoefficientPass:
    """What one pass of H over a pair gives: the coefficients, how many layers were left to the
    sum for their width, and — when measured — per layer its (4, in) measures for the merge's
    diagnostics and H's width for it (lorarar_diagnostics)."""

    coefficients: Coefficients
    fallback: int
    measures: dict[str, torch.Tensor] = field(default_factory=dict)
    widths: dict[str, int] = field(default_factory=dict)


def hypernet_layers(content: LoraFile, style: LoraFile, hypernet: HyperNetwork) -> list[str]:
    """The layers H merges: `to_q`/`to_out.0` (its targets) of attention modules both LoRAs have."""
    targets = hypernet.config.targets
    family = content.family or style.family
    return [n for n in content.layers if n in style.layers and is_hypernet_target(n, targets, family)]


def compute_coefficients(content: LoraFile, style: LoraFile, hypernet: HyperNetwork,
                         unsupported_width: str = "error", progress: Progress | None = None,
                         device: str | None = None) -> tuple[Coefficients, int]:
    """(m_c, m_s) for every layer the hypernetwork merges; also how many layers were left to the
    sum because H has no input layer for their width (only with unsupported_width="sum").
    The pass without the diagnostics (`coefficient_pass` has them)."""
    result = coefficient_pass(content, style, hypernet, unsupported_width, progress, device, measure=False)
    return result.coefficients, result.fallback


def coefficient_pass(content: LoraFile, style: LoraFile, hypernet: HyperNetwork,
                     unsupported_width: str = "error", progress: Progress | None = None,
                     device: str | None = None, measure: bool = True) -> CoefficientPass:
    """Run H over every layer it merges.

    `device` ('cpu' default, 'cuda', …): where H runs — a copy of H (its ~0.5 M weights) and the
    factors H needs go there, products in full float32; the coefficients come back to the CPU.
    `measure`: also collect what the merge's diagnostics need (`lorarar_diagnostics`)."""
    where = resolve_device(device, "lorarar")
    if unsupported_width not in WIDTH_POLICIES:
        raise LoraRarError(f"unsupported_width: expected one of {', '.join(WIDTH_POLICIES)}, got {unsupported_width!r}")
    hypernet.check_finite()
    names = hypernet_layers(content, style, hypernet)
    for n in names:
        check_same_shape(n, content, style)
    unsupported = sorted({content.layers[n].shape[0] for n in names} - set(hypernet.widths))
    if unsupported and unsupported_width == "error":
        example = next(n for n in names if content.layers[n].shape[0] in unsupported)
        raise HypernetError(
            f"layers such as {example} are {'/'.join(map(str, unsupported))} wide; this hypernetwork "
            f"supports widths {'/'.join(map(str, hypernet.widths))} "
            f"(base family {hypernet.config.base_family}). Use a hypernetwork trained for this base "
            "model, or allow the sum for those layers")
    result = CoefficientPass({}, sum(content.layers[n].shape[0] in unsupported for n in names))
    groups, dense = shape_groups(content, style, [n for n in names if content.layers[n].shape[0] not in unsupported])
    total, done = len(names) - result.fallback, 0
    # the buffered CPU pass reads raw factors; an H with normalised inputs goes through its own method
    on_cpu = where.type == "cpu" and hypernet.input_normalisation == "none"
    net = hypernet if on_cpu else copy.deepcopy(hypernet).to(where)  # the caller's H stays where it is
    results: list[tuple[list[str], torch.Tensor, torch.Tensor, torch.Tensor | None]] = []

    def advance(count: int) -> None:
        nonlocal done
        done += count
        if progress:
            progress(done, total)

    with torch.no_grad(), full_float32_matmuls(where):
        for group in groups.values():
            contents, styles = [content.layers[n] for n in group], [style.layers[n] for n in group]
            if on_cpu:
                in_width = math.prod(contents[0].shape[1:])
                measures = torch.empty(len(group), len(MEASURE_ROWS), in_width) if measure else None
                m = group_coefficients(net, contents, styles, progress=advance, measures=measures)
                results.append((group, m[:, 0], m[:, 1], measures))
            else:  # on an accelerator kernel launches are the cost: each group in one call (SDXL: 2)
                out = accelerator_group_coefficients(net, contents, styles, where, measure)
                results.append((group, out[0], out[1], out[2] if measure else None))
                advance(len(group))
        for name in dense:
            c, s = content.layers[name], style.layers[name]
            delta_c, delta_s = c.delta().flatten(1).to(where), s.delta().flatten(1).to(where)
            if measure:
                m_c, m_s, norms = net.coefficients_dense(delta_c, delta_s, input_norms=True)
                measures = torch.cat([norms[None], column_forms_dense(delta_c, delta_s)])[None]
            else:
                (m_c, m_s), measures = net.coefficients_dense(delta_c, delta_s), None
            results.append(([name], m_c[None], m_s[None], measures))
            advance(1)
    for chunk, m_c, m_s, measures in results:  # back to the CPU only now: one wait for the device
        m_c, m_s = m_c.cpu(), m_s.cpu()
        _check_coefficients(chunk, m_c, m_s, content, style)
        result.coefficients.update((n, (m_c[i], m_s[i])) for i, n in enumerate(chunk))
        if measures is not None:
            measures = measures.cpu()
            result.measures.update((n, measures[i]) for i, n in enumerate(chunk))
    result.widths = {n: content.layers[n].shape[0] for n in result.coefficients}
    return result


def _check_coefficients(names: list[str], m_c: torch.Tensor, m_s: torch.Tensor, content: LoraFile,
                        style: LoraFile) -> None:
    """Finite inputs and a finite H can still overflow float32 (LoRA values near 1e30): one error
    naming the layer rather than a merged file full of NaN."""
    bad = ~(torch.isfinite(m_c).all(-1) & torch.isfinite(m_s).all(-1))
    if bad.any():
        name = names[int(bad.nonzero()[0])]
        raise HypernetError(
            f"layer {name}: the hypernetwork's coefficients are not finite (NaN or Inf) for this pair "
            f"({content.source}, {style.source}); the LoRA values there are too large for float32 "
            "arithmetic — check the files with `lorarar inspect`")


def lorarar_merge(content: LoraFile, style: LoraFile, hypernet: HyperNetwork, unsupported_width: str = "error",
                  progress: Progress | None = None, device: str | None = None) -> MergedLora:
    """The strength-free LoRA.rar merge of `content` and `style`; H runs on `device`. The merge
    measures what H contributed (`MergedLora.contribution`) and says so in its report."""
    passed = coefficient_pass(content, style, hypernet, unsupported_width, progress, device)
    merged = assemble(content, style, passed.coefficients, method="lorarar",
                      method_label="merged by the hypernetwork")
    merged.report.width_fallback_layers = passed.fallback
    if not passed.coefficients:
        merged.report.notes.append("no layer was merged by the hypernetwork: the two LoRAs share no attention "
                                   f"layer with its target roles ({'/'.join(hypernet.config.targets)})")
        return merged
    contribution = measure_contribution(hypernet, passed.coefficients, passed.measures, passed.widths)
    merged.contribution = contribution
    # notes, not log lines: the CLI prints them as `note:` lines and the node's report shows
    # them (and logs them for workflows that leave the report unconnected)
    merged.report.notes.append(contribution.summary())
    merged.report.notes.extend(contribution.warnings())
    return merged
