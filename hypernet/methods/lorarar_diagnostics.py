"""What the hypernetwork contributed to one LoRA.rar merge, measured while it merges (issue 17).

H reads each input column x_j = [ΔW_c[:, j]; ΔW_s[:, j]] and gives (m_c[j], m_s[j]) =
W2·relu(W1·x_j + b1) + b2. When the columns are small next to the bias b1 — real trained LoRAs
are, for the official SDXL checkpoint (docs/methods.md, "What the hypernetwork contributes") — every column gets nearly H(0) = W2·relu(b1)
+ b2, a fixed recipe that does not depend on the pair. Per width group of H's layers this module
reports:

- H(0), the mean and spread (standard deviation over all columns) of m_c and m_s, and the share
  of negative coefficients (m < 0 subtracts that LoRA's update from the layer);
- |W1·x_j| / |b1|, the size of the input's term next to the bias (mean over columns);
- how far the merged ΔW is from the merge with the constant coefficients H(0):
  ‖M − M0‖_F / ‖M0‖_F over the group's layers, M = ΔW_c·diag(m_c) + ΔW_s·diag(m_s),
  M0 = h_c·ΔW_c + h_s·ΔW_s; and the same difference measured against the plain sum S = ΔW_c + ΔW_s,
  ‖M − M0‖_F / ‖S‖_F ("input effect": what reacting to the pair changed, as a share of the LoRAs'
  own update there). The summary judges by the input effect: where H(0) switches a side off, M0 is
  small and any reaction looks large next to it, but not next to the LoRAs themselves.

None of it forms an out×in matrix. With ΔW = U·A (U = scale·up), every Frobenius norm above is
Σ_j over columns of a·a·|ΔW_c[:, j]|² + 2·a·b·⟨ΔW_c[:, j], ΔW_s[:, j]⟩ + b·b·|ΔW_s[:, j]|² for
per-column weights (a, b), so three "column forms" per column suffice; they come from the r×r
Gram matrices of the up factors and one r×r by r×in product per block (`column_forms_into`).
|W1·x_j| is read from the activations the coefficient pass computes anyway.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .. import naming
from ..model import HyperNetwork

# Rows of the per-column measures the coefficient pass fills (lorarar_cpu.group_coefficients).
MEASURE_ROWS = ("input_norm", "content_sq", "cross", "style_sq")

# Up to this input effect (‖M − M0‖ / ‖S‖) the merge is "mostly H's fixed recipe": the official
# SDXL checkpoint stays at 5–13% on real and real-sized synthetic pairs, 33% at three times their
# size, 73–77% on the one real file with 3–4× larger columns (docs/methods.md).
FIXED_RECIPE = 0.25
# A coefficient this close to 0 switches its side off (it keeps less than a tenth of that LoRA).
OFF_LEVEL = 0.1
# "Most columns" of a block: more than this share.
MOST = 0.5
SIDES = (("content", "m_c"), ("style", "m_s"))


# ---------------------------------------------------------------------------------------------
# Column forms: |ΔW_c[:, j]|², ⟨ΔW_c[:, j], ΔW_s[:, j]⟩, |ΔW_s[:, j]|² from the factors

def column_forms_into(out: torch.Tensor, ups_c: torch.Tensor, ups_s: torch.Tensor, downs_c: torch.Tensor,
                      downs_s: torch.Tensor, scales: torch.Tensor | None = None) -> None:
    """Fill `out` (..., 3, in) with the three column forms of layers whose ΔW = s·up·down.
    `scales` (..., 2) holds (s_c, s_s) when the ups do not carry them yet (the CPU pass keeps its
    buffers unscaled). Cost per layer: out·r² for the Grams and r²·in for the forms."""
    g_cc, g_cs, g_ss = ups_c.mT @ ups_c, ups_c.mT @ ups_s, ups_s.mT @ ups_s
    # vecdot: one fused pass per form (a product-then-sum over the rank dimension took 10× longer
    # for torch.linalg.vector_norm-style strided reductions, measured on the CPU)
    out[..., 0, :] = torch.linalg.vecdot(g_cc @ downs_c, downs_c, dim=-2)
    out[..., 1, :] = torch.linalg.vecdot(g_cs @ downs_s, downs_c, dim=-2)
    out[..., 2, :] = torch.linalg.vecdot(g_ss @ downs_s, downs_s, dim=-2)
    if scales is not None:
        s_c, s_s = scales[..., 0, None], scales[..., 1, None]
        out[..., 0, :] *= s_c * s_c
        out[..., 1, :] *= s_c * s_s
        out[..., 2, :] *= s_s * s_s


def column_forms(up_c: torch.Tensor, down_c: torch.Tensor, up_s: torch.Tensor, down_s: torch.Tensor) -> torch.Tensor:
    """(..., 3, in) column forms of factored layers (up already carries alpha/rank)."""
    out = torch.empty(*down_c.shape[:-2], 3, down_c.shape[-1], dtype=down_c.dtype, device=down_c.device)
    column_forms_into(out, up_c, up_s, down_c, down_s)
    return out


def column_forms_dense(delta_c: torch.Tensor, delta_s: torch.Tensor) -> torch.Tensor:
    """(3, in) column forms of one layer given as dense out×in updates (LoHa, LoKr, DoRA, …)."""
    return torch.stack([(delta_c * delta_c).sum(0), (delta_c * delta_s).sum(0), (delta_s * delta_s).sum(0)])


# ---------------------------------------------------------------------------------------------
# The figures

def block_of(name: str) -> str:
    """The Transformer2D block a layer lives in (`input_blocks.4.1`), or its attention module."""
    return naming.transformer_block_of(name) or name.rsplit(".attn", 1)[0]


def block_label(block: str) -> str:
    """`input_blocks.4.1` → `in 4`, `middle_block.1` → `mid`, `output_blocks.3.1` → `out 3`."""
    return naming.block_label(block)


def _block_sort_key(block: str):
    try:
        return (0, naming.unet_block_order_key(block))
    except (KeyError, ValueError, IndexError):
        return (1, block)


@dataclass
class WidthFigures:
    """One width group of H's layers (SDXL: 640 and 1280)."""

    width: int
    layers: int
    columns: int
    h0: tuple[float, float]           # (m_c, m_s) for a zero input: H's fixed recipe
    mean: tuple[float, float]
    spread: tuple[float, float]       # standard deviation over all columns of all layers
    negative: tuple[float, float]     # share of columns with m < 0
    input_to_bias: float              # mean over columns of |W1·x_j| / |b1|
    bias_norm: float                  # |b1| of H's input layer for this width
    distance_from_h0: float           # ‖M − M0‖ / ‖M0‖ over the group's layers
    input_effect: float               # ‖M − M0‖ / ‖S‖, S = ΔW_c + ΔW_s
    distance_from_sum: float          # ‖M − S‖ / ‖S‖

    def as_dict(self) -> dict:
        return {"layers": self.layers, "columns": self.columns, "h0": _round(self.h0), "mean": _round(self.mean),
                "spread": _round(self.spread), "negative": _round(self.negative),
                "input_to_bias": _round(self.input_to_bias), "bias_norm": _round(self.bias_norm),
                "distance_from_h0": _round(self.distance_from_h0), "input_effect": _round(self.input_effect),
                "distance_from_sum": _round(self.distance_from_sum)}


@dataclass
class BlockShares:
    """Per Transformer2D block: over all columns of its hypernetwork layers, the share of each
    side's coefficients below −OFF_LEVEL (inverted: the update is subtracted) and within
    ±OFF_LEVEL of 0 (switched off)."""

    block: str
    width: int
    columns: int
    inverted: tuple[float, float]
    off: tuple[float, float]


@dataclass
class HypernetContribution:
    """What H contributed to one merge: the figures per width, the per-block shares behind the
    warnings, and the distances over all of H's layers (`MergedLora.contribution`)."""

    widths: dict[int, WidthFigures]
    blocks: list[BlockShares]
    distance_from_h0: float           # over all of H's layers
    input_effect: float
    distance_from_sum: float

    def summary(self) -> str:
        """One sentence for the report (the node's `report`, the CLI's `note:` lines)."""
        per_width = "; ".join(
            f"{w}-wide m_c {f.mean[0]:+.2f} ± {f.spread[0]:.2f} (H(0) {f.h0[0]:+.2f}, {f.negative[0]:.0%} negative), "
            f"m_s {f.mean[1]:+.2f} ± {f.spread[1]:.2f} (H(0) {f.h0[1]:+.2f})" for w, f in self.widths.items())
        ratios = "/".join(f"{f.input_to_bias:.0%}" for f in self.widths.values())
        moved = f"{_percent(self.input_effect)} of the LoRAs' own update there"
        if self.input_effect <= FIXED_RECIPE:
            head = ("hypernetwork: the coefficients are mostly H's fixed recipe H(0) — reacting to your LoRAs "
                    f"changes the merged to_q/to_out.0 update by {moved}")
        else:
            head = ("hypernetwork: the coefficients depend on your LoRAs — reacting to them changes the merged "
                    f"to_q/to_out.0 update by {moved} against H's fixed recipe H(0)")
        return f"{head}; {per_width}; the input's term |W1·x| is {ratios} of H's bias |b1|"

    def short_summary(self) -> str:
        """A few words for the plot (the drawing helper replaces glyphs its font lacks)."""
        moved = _percent(self.input_effect)
        if self.input_effect <= FIXED_RECIPE:
            return (f"Mostly H's fixed recipe H(0): reacting to your LoRAs changes the merged to_q/to_out.0 update by "
                    f"{moved} of the LoRAs' own size.")
        return (f"H reacts to your LoRAs: it changes the merged to_q/to_out.0 update by {moved} of the LoRAs' own "
                "size against its fixed recipe H(0).")

    def warnings(self) -> list[str]:
        """One warning per side that is inverted or switched off in most columns of some blocks,
        naming the blocks (what a user would otherwise only see as a dip in the plot)."""
        out = []
        for index, (role, symbol) in enumerate(SIDES):
            inverted = [b for b in self.blocks if b.inverted[index] > MOST]
            off = [b for b in self.blocks if b.off[index] > MOST]
            if not inverted and not off:
                continue
            parts = []
            if inverted:
                parts.append(f"inverted ({symbol} < -{OFF_LEVEL:g}: its update is subtracted) in most to_q/to_out.0 "
                             "columns of "
                             + _blocks(inverted))
            if off:
                parts.append(f"switched off (|{symbol}| < {OFF_LEVEL:g}) in most columns of " + _blocks(off))
            out.append(f"hypernetwork warning: the {role} LoRA is " + " and ".join(parts)
                       + f"; there the {role} LoRA acts only through to_k/to_v and the summed layers")
        return out

    def as_dict(self) -> dict:
        """Small JSON for the merged file's metadata (`lorarar.hypernet_contribution`)."""
        return {
            "distance_from_h0": _round(self.distance_from_h0),
            "input_effect": _round(self.input_effect),
            "distance_from_sum": _round(self.distance_from_sum),
            "widths": {str(w): f.as_dict() for w, f in self.widths.items()},
            "inverted": {role: [b.block for b in self.blocks if b.inverted[i] > MOST] for i, (role, _) in enumerate(SIDES)},
            "switched_off": {role: [b.block for b in self.blocks if b.off[i] > MOST] for i, (role, _) in enumerate(SIDES)},
        }


def _percent(value: float) -> str:
    if math.isnan(value):  # the column forms overflowed float32 (ΔW entries beyond ~1e19)
        return "an unmeasurable amount"
    return "∞%" if math.isinf(value) else f"{value:.0%}"


def _blocks(blocks: list[BlockShares]) -> str:
    return ", ".join(block_label(b.block) for b in blocks)


def _round(value):
    if isinstance(value, tuple):
        return [_round(v) for v in value]
    return float(f"{value:.4g}") if math.isfinite(value) else str(value)


def _ratio(numerator2: float, denominator2: float) -> float:
    if denominator2 <= 0:
        return 0.0 if numerator2 <= 0 else math.inf
    return math.sqrt(max(numerator2, 0.0) / denominator2)


def _quadratic(forms: torch.Tensor, a, b) -> float:
    """Σ_j |a_j·ΔW_c[:, j] + b_j·ΔW_s[:, j]|² from the column forms (a, b tensors or numbers)."""
    q_cc, q_cs, q_ss = forms.unbind(0)
    return float((a * a * q_cc + 2 * a * b * q_cs + b * b * q_ss).sum())


def measure_contribution(hypernet: HyperNetwork, coefficients: dict[str, tuple[torch.Tensor, torch.Tensor]],
                         measures: dict[str, torch.Tensor], widths: dict[str, int]) -> HypernetContribution | None:
    """The figures of one merge from its coefficients and the per-column `measures` (4, in) the
    coefficient pass filled for each layer (rows: MEASURE_ROWS); `widths`: layer → H's width
    (its output size). None when H merged no layer."""
    names = [n for n in coefficients if n in measures]
    if not names:
        return None
    groups: dict[int, list[str]] = {}
    for name in names:
        groups.setdefault(widths[name], []).append(name)
    figures: dict[int, WidthFigures] = {}
    totals = [0.0] * 5
    for width in sorted(groups):
        group = groups[width]
        m_c = torch.cat([coefficients[n][0].double().flatten() for n in group])
        m_s = torch.cat([coefficients[n][1].double().flatten() for n in group])
        rows = torch.cat([measures[n].double() for n in group], dim=1)
        forms = rows[1:]
        h_c, h_s = hypernet.zero_input_coefficients(width)
        bias_norm = float(torch.linalg.vector_norm(hypernet.input_layer(width).bias.detach().double()))
        # squared Frobenius norms over the group: merged, H(0) merge, their difference, sum, merged − sum
        norms2 = (_quadratic(forms, m_c, m_s), _quadratic(forms, h_c, h_s), _quadratic(forms, m_c - h_c, m_s - h_s),
                  _quadratic(forms, 1.0, 1.0), _quadratic(forms, m_c - 1, m_s - 1))
        totals = [t + v for t, v in zip(totals, norms2)]
        figures[width] = WidthFigures(
            width=width, layers=len(group), columns=m_c.numel(), h0=(h_c, h_s),
            mean=(float(m_c.mean()), float(m_s.mean())),
            spread=(float(m_c.std(correction=0)), float(m_s.std(correction=0))),
            negative=(float((m_c < 0).double().mean()), float((m_s < 0).double().mean())),
            input_to_bias=float(rows[0].mean()) / bias_norm if bias_norm > 0 else math.inf,
            bias_norm=bias_norm, distance_from_h0=_ratio(norms2[2], norms2[1]),
            input_effect=_ratio(norms2[2], norms2[3]), distance_from_sum=_ratio(norms2[4], norms2[3]))
    return HypernetContribution(figures, block_shares(coefficients, names, widths), _ratio(totals[2], totals[1]),
                                _ratio(totals[2], totals[3]), _ratio(totals[4], totals[3]))


def block_shares(coefficients: dict[str, tuple[torch.Tensor, torch.Tensor]], names: list[str],
                 widths: dict[str, int]) -> list[BlockShares]:
    """Inverted and switched-off shares per Transformer2D block, in UNet order."""
    tallies: dict[str, list] = {}
    for name in names:
        m_c, m_s = coefficients[name]
        tally = tallies.setdefault(block_of(name), [widths[name], 0, 0, 0, 0, 0])
        tally[1] += m_c.numel()
        for offset, m in ((2, m_c), (3, m_s)):
            tally[offset] += int((m < -OFF_LEVEL).sum())
            tally[offset + 2] += int((m.abs() < OFF_LEVEL).sum())
    return [BlockShares(block, t[0], t[1], (t[2] / t[1], t[3] / t[1]), (t[4] / t[1], t[5] / t[1]))
            for block, t in sorted(tallies.items(), key=lambda item: _block_sort_key(item[0]))]
