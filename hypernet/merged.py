"""The one result type of every merge method: a `MergedLora` of `MergedLayer`s, each recording
both sides as they entered the merge.

Per layer, each LoRA that has it contributes one `Side`:

    ΔW_side = scale · up @ down · diag(columns)      (low-rank: LoRA, LoCon)
    ΔW_side = ΔW_file · diag(columns)                (dense: LoHa, LoKr, DoRA, full diffs, Tucker)

and the merged update is ΔW = cs·ΔW_content + ss·ΔW_style (docs/methods.md: strengths act after the
method). `columns` are the per-input-column coefficients of LoRA.rar / ZipLoRA (None = all ones:
a plain sum); NP-LoRA changes a side's `down` (or `up`) instead. Everything else derives from the
sides through one fold, `Side.folded_down` (down · diag(columns)):

- the kohya file (`kohya_entries`): up = [cs·s_c·B_c | ss·s_s·B_s], down = [folded_c; folded_s],
  alpha = rank — exactly the merged ΔW at rank r_c + r_s, no out×in matrix formed;
- ComfyUI's patches (`side_state_dicts`): each side as its own LoRA (its file tensors, the fold in
  `down`), applied at its strength — the same work as two stacked LoRA loaders, and a strength
  change reuses them as they are.

Strengths live on the `MergedLora`, not in the sides, so `with_strengths` is free: the copies share
their layers and therefore every fold already computed.

A method whose weights depend on sampling progress p (K-LoRA) records, per layer, the p at which
it switches from the content side to the style side (`switch_points`); `delta_at(name, p)` gives the
update in use at p, and such a merge has no single-LoRA export.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from . import naming
from .errors import LoraMismatchError, LoraRarError
from .factors import exact_factors, factored_rank
from .lora import FULL, LOHA, LOKR, LoraFile, LoraLayer
from .row_blocks import RowBlocks, Stacked, add_product, dense

CONTENT, STYLE = "content", "style"
# name → (m_c, m_s): per-input-column coefficients of the layers a method scales column-wise
Coefficients = dict[str, tuple[torch.Tensor, torch.Tensor]]


def _column_shape(columns: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(in,) → broadcastable over a (r, in) or (r, in, k, k) factor, or an (out, in[, k, k]) ΔW."""
    return columns.reshape(1, -1, *([1] * (like.dim() - 2)))


@dataclass(eq=False)
class Side:
    """One LoRA's contribution to one layer, before its strength."""

    # (out, r) or (out, r, 1, 1); the file's tensor unless a method changed it — a RowBlocks (the
    # pieces' ups, hypernet/row_blocks.py) for a LoRA made of pieces of a fused weight
    up: torch.Tensor | RowBlocks | None = None
    down: torch.Tensor | Stacked | None = None  # (r, in) or (r, in, k, k); Stacked beside a RowBlocks up
    scale: float = 1.0                    # alpha/rank as the file defines it
    columns: torch.Tensor | None = None   # one coefficient per input column, or None (= ones)
    dense: LoraLayer | None = None        # an adapter without a plain low-rank form: ΔW comes from here
    _folded: torch.Tensor | None = field(default=None, repr=False)

    @classmethod
    def of(cls, layer: LoraLayer, columns: torch.Tensor | None = None) -> Side:
        if layer.is_low_rank and layer.mid is None:
            return cls(layer.up_factor, layer.down_factor, layer.scale, columns)
        return cls(scale=1.0, columns=columns, dense=layer)

    @property
    def is_low_rank(self) -> bool:
        return self.dense is None

    @property
    def rank(self) -> int:
        return self.down.shape[0] if self.is_low_rank else 0

    def folded_down(self) -> torch.Tensor:
        """down · diag(columns), float32 when columns apply (ComfyUI computes patches in float32
        anyway); the file's own tensor when they do not (no copy; a `Stacked` down is formed)."""
        if self.columns is None:
            return dense(self.down)
        if self._folded is None:
            self._folded = dense(self.down, torch.float32) * _column_shape(self.columns.float(), self.down)
        return self._folded

    @property
    def shape(self) -> tuple[int, ...]:
        """The adapted weight's shape, from the factors' shapes (nothing is formed)."""
        if self.is_low_rank:
            return (self.up.shape[0], *self.down.shape[1:])
        return self.dense.shape

    @property
    def factor_rank(self) -> int | None:
        """The rank of `factors()`, from the shapes; None without a factorisation (full diffs)."""
        return self.rank if self.is_low_rank else factored_rank(self.dense)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(U, V) float32, flattened to 2-D, with U @ V = this side's ΔW (scale and columns inside)
        — for any adapter kind, without forming ΔW (hypernet/factors.py); None for a full diff.
        A DoRA side's magnitude is not in them (see hypernet/merge.py's `dora`)."""
        if self.is_low_rank:
            return dense(self.up, torch.float32).flatten(1) * self.scale, self.folded_down().float().flatten(1)
        found = exact_factors(self.dense)
        if found is None:
            return None
        u, v = found
        if self.columns is not None:
            v = (v.reshape(v.shape[0], self.columns.numel(), -1) * self.columns.float().reshape(1, -1, 1)).flatten(1)
        return u, v

    def delta(self) -> torch.Tensor:
        """This side's dense ΔW (float32, scale and columns inside): formed anew at every call, never
        kept (a full-UNet LoHa's would be gigabytes). For tests, dense views and full diffs."""
        if not self.is_low_rank:
            delta = self.dense.delta()
            if self.columns is not None:
                delta = delta * _column_shape(self.columns.float(), delta)
            return delta
        return _product([(self, self.scale)])


def restrict_rows(side: Side, start: int, stop: int, inside: bool) -> Side:
    """The side's ΔW in rows [start, stop) only (inside) or everywhere but there: a LoRA whose up
    has the other rows zeroed (exact, small), or a dense difference for sides without one."""
    if side.is_low_rank:
        up = dense(side.up).clone()
        mask = torch.zeros(up.shape[0], dtype=torch.bool)
        mask[start:stop] = True
        up[~mask if inside else mask] = 0
        return Side(up, side.down, side.scale, side.columns)
    delta = side.delta()
    keep = torch.zeros_like(delta)
    if inside:
        keep[start:stop] = delta[start:stop]
    else:
        keep.copy_(delta)
        keep[start:stop] = 0
    return Side.of(LoraLayer(FULL, {"diff": keep}))


def _product(scaled: list[tuple[Side, float]]) -> torch.Tensor:
    """Σ factor · ΔW of low-rank sides as ONE matrix product [f·up …] @ [folded_down; …]: the scale
    goes into the small up factor, never into an out×in pass (dense views of SDXL's large layers
    are memory-bound; every extra elementwise pass over them cost as much as the product). Sides
    whose up is a `RowBlocks` add their pieces' products into that result's rows."""
    first = scaled[0][0]
    shape = (first.up.shape[0], *first.down.shape[1:])
    plain = [(side, factor) for side, factor in scaled if isinstance(side.up, torch.Tensor)]
    if plain:
        up = torch.cat([side.up.float().flatten(1) * factor for side, factor in plain], dim=1)
        down = torch.cat([side.folded_down().float().flatten(1) for side, _ in plain], dim=0)
        total = up @ down
    else:
        total = torch.zeros(shape[0], math.prod(shape[1:]))
    for side, factor in scaled:
        if not isinstance(side.up, torch.Tensor):
            add_product(total, side.up, side.folded_down().float().flatten(1), factor)
    return total.reshape(shape)


# One side of a one-patch-per-weight layer: (up, down, columns or None, scale · strength).
PatchSide = tuple[torch.Tensor, torch.Tensor, "torch.Tensor | None", float]


def patch_factors(sides: Iterable[PatchSide], device: torch.device | str | None = None,
                  dtype: torch.dtype = torch.float32, multiplier: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(up, down), flattened to 2-D, with up @ down = Σ factor · up · down · diag(columns), built on
    `device` in `dtype`: the factors and strengths go into the small `up`, the column fold into the
    small `down` — never a pass over the out×in result. (An up held as `RowBlocks` is formed
    densely here, on `device`: one layer's, at patch time.)"""
    ups, downs = [], []
    for up, down, columns, factor in sides:
        ups.append(dense(up, dtype, device).flatten(1) * (factor * multiplier))
        down = dense(down, dtype, device)
        if columns is not None:
            down = down * _column_shape(columns.to(device, dtype), down)
        downs.append(down.flatten(1))
    return torch.cat(ups, dim=1), torch.cat(downs, dim=0)


def add_merged_delta(weight: torch.Tensor, sides: Iterable[PatchSide], strength: float = 1.0,
                     function: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """weight + strength · Σ ΔW of `sides` (see `patch_factors`), computed in float32 on the
    weight's device and rounded to the weight's dtype once, whatever precision the caller works in
    (a ComfyUI weight adapter's maths). `function` is ComfyUI's patch function: the identity
    (which returns its argument itself) unless a node set one, and then applied to ΔW."""
    sides = tuple(sides)
    if strength == 0 or not sides:
        return weight
    up, down = patch_factors(sides, weight.device, torch.float32, multiplier=strength)
    probe = weight.new_empty(0)
    identity = function is None or function(probe) is probe
    if identity and weight.dtype == torch.float32 and weight.is_contiguous():
        # ComfyUI's load-time patching hands over a float32 copy: add in place, no out×in temporary
        weight.view(weight.shape[0], -1).addmm_(up, down)
        return weight
    delta = (up @ down).reshape(weight.shape)
    if not identity:
        delta = function(delta)
    result = weight.float().add_(delta)
    return result if weight.dtype == torch.float32 else result.to(weight.dtype)


@dataclass(frozen=True)
class PreparedSides:
    """Σ strength · ΔW of some sides, ready to be formed on one device again and again: the
    low-rank sides as two small float32 factors (scales and strengths inside `up`, columns folded
    into `down`), the dense sides (LoHa, LoKr, …) as one float32 ΔW — made once, since theirs is
    costly to form."""

    up: torch.Tensor | None
    down: torch.Tensor | None
    dense: torch.Tensor | None
    shape: tuple[int, ...]

    @classmethod
    def of(cls, sides: Iterable[tuple[Side, float]], device: torch.device | str | None = None) -> PreparedSides:
        sides = [(side, strength) for side, strength in sides if strength != 0]
        low_rank = [(side.up, side.down, side.columns, side.scale * strength)
                    for side, strength in sides if side.is_low_rank and side.scale != 0]
        up = down = dense = None
        shape: tuple[int, ...] = ()
        if low_rank:
            up, down = patch_factors(low_rank, device)
            shape = (low_rank[0][0].shape[0], *low_rank[0][1].shape[1:])
        for side, strength in sides:
            if not side.is_low_rank:
                part = side.delta().to(device, torch.float32) * strength
                dense = part if dense is None else dense.add_(part)
                shape = tuple(part.shape)
        return cls(up, down, dense, shape)

    def delta(self) -> torch.Tensor | None:
        """The float32 ΔW, or None when there is nothing to add."""
        total = None if self.up is None else (self.up @ self.down).reshape(self.shape)
        if self.dense is not None:
            total = self.dense.clone() if total is None else total.add_(self.dense)
        return total


def fold_columns(sides: Iterable[Side]) -> None:
    """Compute `folded_down` for many sides at once: sides with equal factor shapes are scaled in
    one batched multiply — a few large tensor ops instead of ~560 small ones for SDXL (each small op
    pays thread start-up; on a busy machine that dominated the merge node)."""
    groups: dict[tuple, list[Side]] = {}
    for side in sides:
        if side.is_low_rank and side.columns is not None and side._folded is None:
            groups.setdefault((tuple(side.down.shape), side.down.dtype), []).append(side)
    with torch.no_grad():
        for group in groups.values():
            downs = torch.stack([dense(s.down) for s in group]).float()
            columns = torch.stack([s.columns for s in group]).float()
            folded = downs.mul_(columns.reshape(len(group), 1, -1, *([1] * (downs.dim() - 3))))
            for side, tensor in zip(group, folded.unbind(0)):
                side._folded = tensor


@dataclass(eq=False)
class MergedLayer:
    content: Side | None = None
    style: Side | None = None

    def sides(self) -> list[tuple[str, Side]]:
        return [(role, side) for role, side in ((CONTENT, self.content), (STYLE, self.style)) if side is not None]

    @property
    def is_low_rank(self) -> bool:
        return all(side.is_low_rank for _, side in self.sides())

    @property
    def rank(self) -> int:
        return sum(side.rank for _, side in self.sides())

    @property
    def shape(self) -> tuple[int, ...]:
        """The weight's shape; a conv kernel where any side has one (a flat LoHa/LoKr side does not)."""
        return max((side.shape for _, side in self.sides()), key=len)

    @property
    def factor_rank(self) -> int | None:
        """Rank of the exact LoRA this layer is written as; None: written as a full difference."""
        ranks = [side.factor_rank for _, side in self.sides()]
        return None if None in ranks else sum(ranks)


@dataclass
class MergeReport:
    method: str
    method_layers: int = 0          # layers the method did more than sum (coefficients, projection, switching)
    summed_layers: int = 0
    content_only_layers: int = 0
    style_only_layers: int = 0
    dense_layers: int = 0           # kept as full weight differences (LoHa, LoKr, DoRA, diff, Tucker)
    width_fallback_layers: int = 0  # hypernetwork layers summed because H lacks their width
    # DoRA layers whose magnitude a written file does not carry (merge(..., dora=...))
    dora_magnitude_dropped: int = 0
    method_label: str = "merged by the method"
    notes: list[str] = field(default_factory=list)
    # what a user must see even where the report is not read (shown on the ComfyUI node): an empty
    # merge, layers left out. Each is also in `notes`.
    alerts: list[str] = field(default_factory=list)
    # role → how many of that input's layers were left out (keys the reader did not recognise)
    left_out: dict[str, int] = field(default_factory=dict)

    def summary(self) -> str:
        parts = [f"method {self.method}", f"{self.method_layers} layers {self.method_label}",
                 f"{self.summed_layers} summed", f"{self.content_only_layers} content-only",
                 f"{self.style_only_layers} style-only"]
        if self.dense_layers:
            parts.append(f"{self.dense_layers} kept as full weight differences (non-low-rank adapters)")
        if self.width_fallback_layers:
            parts.append(f"{self.width_fallback_layers} summed because the hypernetwork has no input for their width")
        for role, count in self.left_out.items():
            parts.append(f"{count} layer(s) of the {role} LoRA LEFT OUT (keys not recognised as layers of the model)")
        return "; ".join(parts)

    def as_dict(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in ("notes", "alerts", "method_label")}


@dataclass(eq=False)
class MergedLora:
    layers: dict[str, MergedLayer]
    report: MergeReport
    coefficients: Coefficients = field(default_factory=dict)
    content_strength: float = 1.0
    style_strength: float = 1.0
    # name → p at which the layer switches from the content side to the style side (K-LoRA)
    switch_points: dict[str, float] = field(default_factory=dict)
    # name → (start, stop): the rows of a switching layer that switch, where only some do (Flux's
    # single-block linear1: q, k, v switch, its MLP-input rows stay the sum); absent = all rows
    switch_rows: dict[str, tuple[int, int]] = field(default_factory=dict)
    # name → the one number per layer that a method reports for its picture (NP-LoRA: the share
    # of the content update it projected away); empty where a method has none
    layer_values: dict[str, float] = field(default_factory=dict)
    # LoRA.rar: what the hypernetwork contributed to this merge, measured during it
    # (methods/lorarar_diagnostics.HypernetContribution: per width H(0), coefficient statistics,
    # |W1·x|/|b1|, distance from the H(0) merge); None for other methods
    contribution: Any = None
    # the base-model family (hypernet/families) the merged layers belong to: decides the keys a
    # file of the merge is written with
    family: str | None = None
    # strength-free derived data shared by every `with_strengths` copy (ComfyUI patch dicts)
    _shared: dict = field(default_factory=dict, repr=False)

    def strength(self, role: str) -> float:
        return self.content_strength if role == CONTENT else self.style_strength

    def with_strengths(self, content_strength: float, style_strength: float) -> MergedLora:
        """The same merge at other strengths; shares layers, folds and patch dicts (no copy)."""
        return dataclasses.replace(self, content_strength=float(content_strength),
                                   style_strength=float(style_strength),
                                   report=dataclasses.replace(self.report, notes=list(self.report.notes),
                                                              alerts=list(self.report.alerts)))

    # -- dense views (tests, the testbed's sampler, small layers) ---------------------------------

    def delta(self, name: str) -> torch.Tensor:
        """The merged ΔW of one layer (float32). For a scheduled layer: its update at p = 0."""
        return self.delta_at(name, 0.0)

    def delta_at(self, name: str, progress: float) -> torch.Tensor:
        """The ΔW in use when a fraction `progress` of sampling is done. Static methods: the same
        at every p; a scheduled layer uses only its content side before its switch point."""
        layer = self.layers[name]
        sides = layer.sides()
        if name in self.switch_points:
            role = CONTENT if progress < self.switch_points[name] else STYLE
            if name in self.switch_rows:  # only those rows switch; the others stay the sum
                start, stop = self.switch_rows[name]
                total = self._delta_of(layer, sides)
                total[start:stop] = self._delta_of(layer, [(r, s) for r, s in sides if r == role])[start:stop]
                return total
            sides = [(r, s) for r, s in sides if r == role]
        return self._delta_of(layer, sides)

    def _delta_of(self, layer: MergedLayer, sides: list[tuple[str, Side]]) -> torch.Tensor:
        shape = layer.shape  # (a flat conv LoHa side is reshaped to the other side's kernel)
        low_rank = [(side, side.scale * self.strength(role)) for role, side in sides if side.is_low_rank]
        total = _product(low_rank).reshape(shape) if low_rank else None
        for role, side in sides:
            if not side.is_low_rank:
                part = (side.delta() * self.strength(role)).reshape(shape)
                total = part if total is None else total.add_(part)
        return total if total is not None else torch.zeros(shape)

    def layer_patch(self, name: str) -> tuple[PatchSide, ...] | None:
        """What one ComfyUI patch needs to add this layer's merged ΔW: per side with a non-zero
        factor, (up, down, columns or None, scale · strength) — the sides' own tensors, nothing
        copied, folded or concatenated here (`patch_factors` does that where the weight is, at
        patch time). None for a layer with a dense side (no low-rank form), a scheduled layer,
        or one whose sides are all at strength 0."""
        layer = self.layers[name]
        if not layer.is_low_rank or name in self.switch_points:
            return None
        sides = tuple((side.up, side.down, side.columns, side.scale * self.strength(role))
                      for role, side in layer.sides() if side.scale * self.strength(role) != 0)
        return sides or None

    def layer_factors(self, name: str, device: torch.device | str | None = None,
                      dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(up, down) with up @ down = this layer's merged ΔW (flattened to 2-D), built on `device`
        (see `layer_patch`); None where `layer_patch` is None."""
        patch = self.layer_patch(name)
        return None if patch is None else patch_factors(patch, device, dtype)

    # -- exports -------------------------------------------------------------------------------

    def _require_single_lora(self, what: str) -> None:
        if self.switch_points:
            raise LoraRarError(
                f"{what}: a {self.report.method} merge switches between the two LoRAs during sampling "
                f"({len(self.switch_points)} layers), so it is not one LoRA that could be saved or loaded "
                "elsewhere; use its patched MODEL, or save a merge of another method")

    def ranks(self) -> list[int]:
        """The rank of every layer the kohya file writes as a LoRA (alpha = rank)."""
        return [rank for layer in self.layers.values() if (rank := layer.factor_rank) is not None]

    def kohya_entries(self, dtype: torch.dtype = torch.float32):
        """(key, dtype, shape, make_tensor) for every tensor of the kohya file, lazily: listing the
        entries forms nothing (the merge node lists them for its LORA_MODEL output, which most
        workflows never read; shapes come from the factors' shapes); the first tensor made folds
        every low-rank layer's columns at once. Every layer is written as an exact LoRA of rank
        Σ its sides' factor ranks (LoHa, LoKr and Tucker sides through hypernet/factors.py), so
        the file is plain LoRA; only a side that has no smaller factorisation (a full diff, a LoKr
        of two whole factors) makes its layer a `.diff`. Tensors are made one layer at a time."""
        self._require_single_lora("merged LoRA")
        folded = []
        memo: dict = {}

        def down_of(sides) -> torch.Tensor:
            if not folded:  # first tensor made: fold every layer's columns in one batched pass
                fold_columns(side for layer in self.layers.values() for _, side in layer.sides())
                folded.append(True)
            return torch.cat([side.folded_down().float() for _, side in sides], dim=0)

        def factors_of(name: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
            # up and down of one layer are made one after the other: factorise once, keep one layer
            if memo.get("name") != name:
                memo.clear()
                memo.update(name=name, factors=[side.factors() for _, side in self.layers[name].sides()])
            return memo["factors"]

        def up_of(name: str, shape: tuple[int, ...]) -> torch.Tensor:
            roles = [role for role, _ in self.layers[name].sides()]
            return torch.cat([u * self.strength(role) for (u, _), role in zip(factors_of(name), roles)],
                             dim=1).reshape(shape)

        def dense_down_of(name: str, shape: tuple[int, ...]) -> torch.Tensor:
            return torch.cat([v for _, v in factors_of(name)], dim=0).reshape(shape)

        entries = []
        for name, layer in self.layers.items():
            key = naming.kohya_key(name, self.family)
            rank = layer.factor_rank
            if rank is None:
                entries.append((f"{key}.diff", dtype, tuple(layer.shape), lambda n=name: self.delta(n)))
                continue
            sides = layer.sides()
            shape = layer.shape
            up_shape = (shape[0], rank, *([1] * (len(shape) - 2)))
            down_shape = (rank, *shape[1:])
            if layer.is_low_rank:
                entries.append((f"{key}.lora_up.weight", dtype, up_shape, lambda s=sides: torch.cat(
                    [dense(side.up, torch.float32) * (side.scale * self.strength(role)) for role, side in s], dim=1)))
                entries.append((f"{key}.lora_down.weight", dtype, down_shape, lambda s=sides: down_of(s)))
            else:
                entries.append((f"{key}.lora_up.weight", dtype, up_shape,
                                lambda n=name, sh=up_shape: up_of(n, sh)))
                entries.append((f"{key}.lora_down.weight", dtype, down_shape,
                                lambda n=name, sh=down_shape: dense_down_of(n, sh)))
            # alpha = rank: each side's scale and strength are already inside up.
            entries.append((f"{key}.alpha", torch.float32, (), lambda r=rank: torch.tensor(float(r))))
        return entries

    def to_state_dict(self, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        """Materialise as a kohya LoRA state dict (what ComfyUI's LORA_MODEL carries)."""
        return {key: make().to(kind).contiguous() for key, kind, _, make in self.kohya_entries(dtype)}

    def side_state_dicts(self, include_text_encoders: bool = True) -> dict[str, dict[str, torch.Tensor]]:
        """role → a kohya dict of that side alone (the fold in `down`, dense sides as `.diff`),
        to be patched at the side's strength. Strength-free, so cached across `with_strengths`."""
        self._require_single_lora("patches")
        key = ("side_state_dicts", include_text_encoders)
        if key not in self._shared:
            layers = {n: layer for n, layer in self.layers.items()
                      if include_text_encoders or not naming.is_text_encoder(n)}
            fold_columns(side for layer in layers.values() for _, side in layer.sides())
            dicts: dict[str, dict[str, torch.Tensor]] = {CONTENT: {}, STYLE: {}}
            for name, layer in layers.items():
                kohya = naming.kohya_key(name, self.family)
                for role, side in layer.sides():
                    out = dicts[role]
                    if side.is_low_rank:
                        out[f"{kohya}.lora_up.weight"] = dense(side.up)
                        out[f"{kohya}.lora_down.weight"] = side.folded_down()
                        # alpha such that ComfyUI's alpha/rank is exactly this side's scale, however
                        # the file defined it (tensor, header metadata, rsLoRA)
                        out[f"{kohya}.alpha"] = torch.tensor(float(side.scale * side.rank))
                    else:
                        out.update(native_patch(kohya, side))
            self._shared[key] = dicts
        return self._shared[key]


# The kohya key suffix of each tensor role (lora.py's roles), as ComfyUI's loaders read them.
_KOHYA_SUFFIX = {"up": "lora_up.weight", "down": "lora_down.weight", "mid": "lora_mid.weight"}


def native_patch(kohya: str, side: Side) -> dict[str, torch.Tensor]:
    """A side without a plain low-rank form (LoHa, LoKr, DoRA, Tucker LoCon, full diff) as ComfyUI
    patches it from its own file: its own tensors under kohya names, applied by ComfyUI's own weight
    adapters — exactly as a LoRA loader would apply that file (DoRA with the model's weight), and
    never a dense ΔW. Column coefficients are folded into LoHa's `hada_w1_b` (ΔW = (A1·B1) ⊙
    (A2·B2): scaling B1's columns scales ΔW's); for other kinds with columns the dense ΔW is the
    only exact form left."""
    layer = side.dense
    tensors = dict(layer.tensors)
    if side.columns is not None:
        if layer.kind != LOHA or "hada_t1" in tensors or layer.is_dora:
            return {f"{kohya}.diff": side.delta()}
        tensors["hada_w1_b"] = tensors["hada_w1_b"].float() * side.columns.float().reshape(1, -1)
    out = {f"{kohya}.{_KOHYA_SUFFIX.get(role, role)}": tensor for role, tensor in tensors.items()}
    if layer.uses_alpha and layer.alpha is not None:
        # ComfyUI divides by the first factor's rank (LoRA: down's, LoHa: hada_w1_b's) — our
        # kohya-equivalent alpha's convention — except for LoKr, whose own alpha is kept as read
        alpha = layer.alpha if layer.kind == LOKR else layer.scale * layer.rank
        out[f"{kohya}.alpha"] = torch.tensor(float(alpha))
    return out


# ---------------------------------------------------------------------------------------------
# Building a MergedLora from two LoRAs

def _matrix_shape(shape: tuple[int, ...]) -> tuple[int, int]:
    return shape[0], math.prod(shape[1:])


def check_same_shape(name: str, content: LoraFile, style: LoraFile) -> None:
    """Both sides must adapt the same weight. Compared as out × in·k·k: a conv LoHa or LoKr is
    stored flat (LyCORIS writes it so; loaders reshape it), a conv LoRA with its kernel."""
    c, s = content.layers[name].shape, style.layers[name].shape
    if _matrix_shape(c) != _matrix_shape(s):
        raise LoraMismatchError(
            f"layer {name} has shape {c} in the content LoRA ({content.source}) but {s} in the "
            f"style LoRA ({style.source}); were they trained for different base models?")


def layer_names(content: LoraFile, style: LoraFile) -> list[str]:
    """Every layer of either LoRA, content's order first."""
    return list(content.layers) + [n for n in style.layers if n not in content.layers]


def assemble(content: LoraFile, style: LoraFile, coefficients: Coefficients | None = None,
             content_strength: float = 1.0, style_strength: float = 1.0, method: str = "sum",
             method_label: str = "merged by the method") -> MergedLora:
    """The merged LoRA of a column-scaling method (LoRA.rar, ZipLoRA; no coefficients = sum):
    layers in `coefficients` get those columns, every other shared layer is summed, a layer
    present in one LoRA is passed through."""
    coefficients = coefficients or {}
    report = MergeReport(method, method_label=method_label)
    layers: dict[str, MergedLayer] = {}
    for name in layer_names(content, style):
        c, s = content.layers.get(name), style.layers.get(name)
        m = coefficients.get(name)
        if c is not None and s is not None:
            check_same_shape(name, content, style)
            if m is not None:
                report.method_layers += 1
            else:
                report.summed_layers += 1
        elif c is not None:
            report.content_only_layers += 1
        else:
            report.style_only_layers += 1
        layer = MergedLayer(Side.of(c, m[0] if m else None) if c is not None else None,
                            Side.of(s, m[1] if m else None) if s is not None else None)
        report.dense_layers += not layer.is_low_rank
        layers[name] = layer
    describe_inputs(report, content, style)
    return MergedLora(layers, report, dict(coefficients), float(content_strength), float(style_strength),
                      family=content.family or style.family)


def describe_inputs(report: MergeReport, content: LoraFile, style: LoraFile) -> None:
    """What the reader found about each input and a user must be told, not only a log: layers
    left out (keys it did not recognise), where alpha came from or that scale 1 was assumed."""
    for role, lora in ((CONTENT, content), (STYLE, style)):
        if lora.unrecognised_keys:
            report.left_out[role] = len(lora.unrecognised_modules)
            report.alerts.append(f"{report.left_out[role]} layer(s) of the {role} LoRA were LEFT OUT (keys not "
                                 "recognised); see the report")
        report.notes.extend(f"{role} LoRA: {note}" for note in lora.notes)


def rank_summary(merged: MergedLora) -> dict[str, str]:
    """kohya's `ss_network_dim`/`ss_network_alpha` — the most common rank (alpha = rank in our
    files) — and, where layers differ, the per-layer truth: a rank histogram and every layer whose
    rank is not the common one (kohya keys)."""
    ranks = Counter(merged.ranks())
    if not ranks:
        return {}
    common = ranks.most_common(1)[0][0]
    out = {"ss_network_dim": str(common), "ss_network_alpha": str(common)}
    if len(ranks) > 1:
        out["lorarar.rank_counts"] = json.dumps({str(r): n for r, n in sorted(ranks.items())})
        out["lorarar.other_ranks"] = json.dumps(
            {naming.kohya_key(n, merged.family): layer.rank for n, layer in merged.layers.items()
             if layer.is_low_rank and layer.rank != common}, separators=(",", ":"))
    return out
