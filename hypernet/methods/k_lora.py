"""K-LoRA (Ouyang, Li, Hou — CVPR 2025), training-free, with its per-call work precomputed.

On every attention projection the family's data lists for K-LoRA (SDXL/SD1.5/SD2: to_q, to_k,
to_v, to_out.0 of attn1 and attn2; Flux: the image stream's qkv and proj of the double blocks and
q/k/v of the single blocks; the other families in hypernet/families/data, each with why) present in
both LoRAs, ONE of the two LoRAs is used at each denoising step: with S = the sum of the top-k
|entries| of that side's ΔW (official k = 64), a balance γ = the mean over those layers of
Σ|ΔW_c| / Σ|ΔW_s|, and sampling progress p ∈ [0, 1],

    content iff S_c/γ > S_s·(α·p + β)          (official α = 1.5, β = 0.5: content early, style late)

Every other layer is summed (docs/methods.md). The right-hand side grows with p, so each layer switches
at most once, at

    p_l = ((S_c/γ)/S_s − β)/α:   content for p < p_l, style from p_l on

(p_l ≤ 0: style throughout; p_l ≥ 1: content throughout). The official code forms both dense ΔW
and a top-k at every layer call; here the switch points are computed once per pair
(`MergedLora.switch_points`) and `MergedLora.delta_at(name, p)` gives the update in use at p.
Where a fused weight holds projections that switch and others that do not (Flux's single-block
linear1 = q, k, v and the MLP input), only those rows switch (`MergedLora.switch_rows`) and their
magnitudes are those rows' ΔW; q, k and v of one fused weight switch together (one weight, one
switch point).

S and Σ|ΔW| are statistics of the dense entries, which no factored form gives exactly, so each
ΔW is formed (in row chunks for layers beyond SDXL's attention sizes), reduced at once and
dropped: one layer's ΔW at a time, at most 16 MiB. ΔW is the file's own (alpha/rank applied), never the strengths (docs/methods.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .. import families, naming
from ..devices import resolve_device
from ..errors import LoraRarError
from ..lora import LoraFile
from ..merged import MergedLora, Side, assemble
from ..progress import Progress
from ..row_blocks import rows_of

DEFAULT_TOP_K, DEFAULT_ALPHA, DEFAULT_BETA = 64, 1.5, 0.5
# Elements of ΔW formed at a time: 2^22 float32 = 16 MiB, a whole SDXL attention projection
# (at most 1280×2048) in one product, which ran at about twice the speed of cache-sized row
# chunks on this project's CPU; larger layers are formed in row chunks of that size.
CHUNK_ELEMENTS = 1 << 22


def switched_rows(name: str, shape: tuple[int, ...], family: str | None = None) -> tuple[int, int] | bool:
    """Whether the layer switches (text encoders never do): False, True (all of it), or the
    (start, stop) rows that do — from the family's data."""
    if naming.is_text_encoder(name):
        return False
    return families.get(family or "sdxl").switched_rows(name, tuple(shape))


def is_switched_layer(name: str, family: str | None = None, shape: tuple[int, ...] = (0, 0)) -> bool:
    """An attention projection that K-LoRA switches (text encoders are summed)."""
    return switched_rows(name, shape, family) is not False


@dataclass(frozen=True)
class Magnitude:
    top: float     # S: sum of the top-k |entries| of ΔW
    total: float   # Σ|ΔW|


def _top_values(chunk: torch.Tensor, top_k: int) -> torch.Tensor:
    """The top-k values of a 2-D chunk of |ΔW|. Only rows whose maximum is among the chunk's
    k largest row maxima can hold one of them (those k maxima are themselves entries), so the
    top-k runs on at most a few rows instead of the whole chunk."""
    if chunk.shape[0] > top_k:
        row_max = chunk.amax(dim=1)
        chunk = chunk[row_max >= row_max.topk(top_k).values[-1]]
    flat = chunk.reshape(-1)
    return flat.topk(min(top_k, flat.numel())).values


def magnitude(side: Side, top_k: int, device: torch.device | None = None,
              rows: tuple[int, int] | None = None) -> Magnitude:
    """S and Σ|ΔW| of one side's ΔW (its file's scale applied) — of its `rows` only, if given —
    formed a chunk of rows at a time on `device` (default: where the factors are)."""
    start, stop = rows if rows else (0, None)
    if side.is_low_rank:
        up = rows_of(side.up, start, stop).to(device)
        down = side.folded_down().to(device, torch.float32).reshape(side.down.shape[0], -1)
        scale = abs(side.scale)
    else:
        delta = side.delta()[start:stop].to(device)
        up, down, scale = None, delta.reshape(delta.shape[0], -1), 1.0
    rows = max(1, CHUNK_ELEMENTS // max(1, down.shape[1]))
    exact = torch.float64 if down.device.type == "cpu" else torch.float32  # (MPS has no float64)
    total = 0.0
    candidates = []
    for start in range(0, (up if up is not None else down).shape[0], rows):
        if up is not None:
            chunk = (up[start:start + rows] @ down).abs_()  # a fresh product: |·| in place
        else:
            chunk = down[start:start + rows].abs()         # a view of the side's cached ΔW
        total += float(chunk.sum(dtype=exact))
        candidates.append(_top_values(chunk, top_k))
    values = torch.cat(candidates)
    top = values.topk(min(top_k, values.numel())).values.sum(dtype=exact)
    return Magnitude(float(top) * scale, total * scale)


def balance(magnitudes: dict[str, tuple[Magnitude, Magnitude]]) -> float:
    """γ = mean over layers of Σ|ΔW_c| / Σ|ΔW_s| (layers whose style update is zero have no ratio)."""
    ratios = [c.total / s.total for c, s in magnitudes.values() if s.total > 0]
    gamma = sum(ratios) / len(ratios) if ratios else 0.0
    return gamma if gamma > 0 and math.isfinite(gamma) else 1.0


def switch_point(content: Magnitude, style: Magnitude, gamma: float, alpha: float, beta: float) -> float:
    """p_l: the rule S_c/γ > S_s·(α·p + β) holds exactly for p < p_l."""
    if style.top <= 0:  # S_s·(α·p + β) = 0: content wherever it is non-zero
        return math.inf if content.top > 0 else -math.inf
    return ((content.top / gamma) / style.top - beta) / alpha


def check_params(top_k: int, alpha: float, beta: float) -> None:
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise LoraRarError(f"k-lora: top_k must be a whole number >= 1 (official: 64), got {top_k!r}")
    if not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha <= 0:
        raise LoraRarError(f"k-lora: alpha must be a number > 0 (official: 1.5; it makes the style "
                           f"LoRA take over as sampling progresses), got {alpha!r}")
    if not isinstance(beta, (int, float)) or not math.isfinite(beta):
        raise LoraRarError(f"k-lora: beta must be a finite number (official: 0.5), got {beta!r}")


def k_lora_merge(content: LoraFile, style: LoraFile, top_k: int = DEFAULT_TOP_K, alpha: float = DEFAULT_ALPHA,
                 beta: float = DEFAULT_BETA, progress: Progress | None = None, device: str | None = None) -> MergedLora:
    """The strength-free K-LoRA merge: every shared layer as both sides, attention projections
    with their switch points, the rest summed. `device`: where the dense products for the
    magnitudes are formed (the ComfyUI node passes its GPU; the result does not depend on it
    beyond float rounding)."""
    check_params(top_k, alpha, beta)
    where = resolve_device(device, "k-lora")
    merged = assemble(content, style, method="k-lora",
                      method_label="switched from content to style during sampling")
    family = content.family or style.family
    rows = {}
    for name, layer in merged.layers.items():
        if layer.content is not None and layer.style is not None:
            found = switched_rows(name, layer.shape, family)
            if found is not False:
                rows[name] = None if found is True else found
    names = list(rows)
    magnitudes: dict[str, tuple[Magnitude, Magnitude]] = {}
    with torch.no_grad():
        for done, name in enumerate(names, start=1):
            layer = merged.layers[name]
            magnitudes[name] = (magnitude(layer.content, top_k, where, rows[name]),
                                magnitude(layer.style, top_k, where, rows[name]))
            if progress:
                progress(done, len(names))
    gamma = balance(magnitudes)
    merged.switch_points = {n: switch_point(c, s, gamma, alpha, beta) for n, (c, s) in magnitudes.items()}
    merged.switch_rows = {n: r for n, r in rows.items() if r is not None}
    merged.report.method_layers = len(names)
    merged.report.summed_layers -= len(names)
    points = list(merged.switch_points.values())
    merged.report.notes.append(
        f"k-lora: gamma = {gamma:.4g}; of {len(points)} attention projections, "
        f"{sum(0 < p < 1 for p in points)} switch from content to style during sampling, "
        f"{sum(p <= 0 for p in points)} use the style LoRA throughout, "
        f"{sum(p >= 1 for p in points)} the content LoRA throughout")
    if not names:
        merged.report.notes.append("k-lora: the two LoRAs share no attention projection; everything was summed")
    return merged
