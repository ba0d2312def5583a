"""Merge a content (subject) LoRA and a style LoRA: LoRA.rar's hypernetwork merge and the plain sum.

Per layer with updates ΔW_c and ΔW_s (DESIGN §4, §10):
- hypernetwork layers (`to_q`, `to_out.0` of attn1/attn2 by default):
  ΔW = cs·ΔW_c·diag(m_c) + ss·ΔW_s·diag(m_s), (m_c, m_s) = H applied to each column pair;
- every other layer, text encoders included: ΔW = cs·ΔW_c + ss·ΔW_s;
- a layer present in only one LoRA: that side times its strength.

The coefficients depend only on the LoRAs as their files define them, never on the strengths,
so `compute_coefficients` runs once and `assemble` is cheap to redo for new strengths.

For low-rank inputs the result is exactly a LoRA of rank r_c + r_s:
up = [cs·s_c·B_c | ss·s_s·B_s], down = [A_c·diag(m_c); A_s·diag(m_s)], alpha = rank —
no out×in matrix is ever formed. Layers involving LoHa/LoKr/DoRA/full diffs or Tucker convs
have no such form and are kept as dense weight differences.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from . import naming
from .errors import HypernetError, LoraMismatchError
from .lora import LoraFile, LoraLayer
from .model import HyperNetwork

log = logging.getLogger(__name__)

METHODS = ("lorarar", "sum")
Progress = Callable[[int, int], None]
Coefficients = dict[str, tuple[torch.Tensor, torch.Tensor]]


@dataclass
class LowRankPart:
    """One side's contribution `scale · up @ down · diag(columns)`."""

    up: torch.Tensor              # (out, r) or (out, r, 1, 1), file dtype
    down: torch.Tensor            # (r, in) or (r, in, k, k), file dtype
    scale: float                  # alpha/rank × strength
    columns: torch.Tensor | None  # m for each input column, or None (= all ones)

    def scaled_up(self) -> torch.Tensor:
        return self.up.float() * self.scale

    def scaled_down(self) -> torch.Tensor:
        down = self.down.float()
        return down if self.columns is None else down * self.columns.reshape(1, -1, *([1] * (down.dim() - 2)))


@dataclass
class MergedLayer:
    parts: list[LowRankPart] = field(default_factory=list)
    diff: torch.Tensor | None = None  # dense ΔW when there is no low-rank form

    @property
    def rank(self) -> int:
        return sum(p.down.shape[0] for p in self.parts)

    def up(self) -> torch.Tensor:
        return torch.cat([p.scaled_up() for p in self.parts], dim=1)

    def down(self) -> torch.Tensor:
        return torch.cat([p.scaled_down() for p in self.parts], dim=0)

    def delta(self) -> torch.Tensor:
        if self.diff is not None:
            return self.diff
        up, down = self.up(), self.down()
        return (up.flatten(1) @ down.flatten(1)).reshape(up.shape[0], *down.shape[1:])


@dataclass
class MergeReport:
    method: str
    hypernet_layers: int = 0
    summed_layers: int = 0
    content_only_layers: int = 0
    style_only_layers: int = 0
    dense_layers: int = 0          # kept as full weight differences (LoHa, LoKr, DoRA, diff, Tucker)
    width_fallback_layers: int = 0  # hypernetwork layers summed because H lacks their width
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        parts = [f"method {self.method}", f"{self.hypernet_layers} layers merged by the hypernetwork",
                 f"{self.summed_layers} summed", f"{self.content_only_layers} content-only",
                 f"{self.style_only_layers} style-only"]
        if self.dense_layers:
            parts.append(f"{self.dense_layers} kept as full weight differences (non-low-rank adapters)")
        if self.width_fallback_layers:
            parts.append(f"{self.width_fallback_layers} summed because the hypernetwork has no input for their width")
        return "; ".join(parts)


@dataclass
class MergedLora:
    layers: dict[str, MergedLayer]
    coefficients: Coefficients
    report: MergeReport
    content_strength: float
    style_strength: float

    def delta(self, name: str) -> torch.Tensor:
        return self.layers[name].delta()

    def kohya_entries(self, dtype: torch.dtype = torch.float32):
        """(key, dtype, shape, make_tensor) for every tensor of the kohya file, lazily."""
        entries = []
        for name, layer in self.layers.items():
            key = naming.ldm_to_kohya_key(name)
            if layer.diff is not None:
                entries.append((f"{key}.diff", dtype, tuple(layer.diff.shape), lambda layer=layer: layer.diff))
                continue
            first = layer.parts[0]
            rank = layer.rank
            up_shape = (first.up.shape[0], rank, *first.up.shape[2:])
            down_shape = (rank, *first.down.shape[1:])
            entries.append((f"{key}.lora_up.weight", dtype, up_shape, layer.up))
            entries.append((f"{key}.lora_down.weight", dtype, down_shape, layer.down))
            # alpha = rank: the scale is already inside up.
            entries.append((f"{key}.alpha", torch.float32, (), lambda r=rank: torch.tensor(float(r))))
        return entries

    def to_state_dict(self, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        """Materialise as a kohya SDXL LoRA state dict (what ComfyUI's LORA_MODEL carries)."""
        return {key: make().to(kind).contiguous() for key, kind, _, make in self.kohya_entries(dtype)}

    def ranks(self) -> list[int]:
        return [layer.rank for layer in self.layers.values() if layer.diff is None]


def is_hypernet_target(name: str, targets: tuple[str, ...]) -> bool:
    if naming.is_text_encoder(name):
        return False
    return any(re.search(rf"\.attn[12]\.{re.escape(t)}$", name) for t in targets)


def _check_same_shape(name: str, content: LoraFile, style: LoraFile) -> None:
    c, s = content.layers[name].shape, style.layers[name].shape
    if c != s:
        raise LoraMismatchError(
            f"layer {name} has shape {c} in the content LoRA ({content.source}) but {s} in the "
            f"style LoRA ({style.source}); were they trained for different base models?")


def _concatenable(layer: LoraLayer) -> bool:
    return layer.is_low_rank and layer.mid is None


# Layers per batched hypernetwork call. Small batches keep the (batch, hidden, in) activations
# in cache: on the idle 2-core CPU, batches of 2–16 took 0.20–0.22 s for SDXL's 280 rank-64
# matrices, batches of 48 took 0.28–0.36 s.
_BATCH = 4


def _stacked_factors(layers: list[LoraLayer]) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale·up, down) of same-shape layers stacked to (L, out, r) and (L, r, in), float32."""
    scales = torch.tensor([layer.scale for layer in layers], dtype=torch.float32).reshape(-1, 1, 1)
    ups = torch.stack([layer.up.reshape(layer.up.shape[0], -1) for layer in layers]).float() * scales
    downs = torch.stack([layer.down.reshape(layer.down.shape[0], -1) for layer in layers]).float()
    return ups, downs


def compute_coefficients(content: LoraFile, style: LoraFile, hypernet: HyperNetwork,
                         unsupported_width: str = "error", progress: Progress | None = None,
                         ) -> tuple[Coefficients, int]:
    """(m_c, m_s) for every layer the hypernetwork merges; also how many layers were left to the
    sum because H has no input layer for their width (only with unsupported_width="sum")."""
    if unsupported_width not in ("error", "sum"):
        raise ValueError(f"unsupported_width must be 'error' or 'sum', not {unsupported_width!r}")
    targets = hypernet.config.targets
    names = [n for n in content.layers if n in style.layers and is_hypernet_target(n, targets)]
    for n in names:
        _check_same_shape(n, content, style)
    unsupported = sorted({content.layers[n].shape[0] for n in names} - set(hypernet.widths))
    if unsupported and unsupported_width == "error":
        example = next(n for n in names if content.layers[n].shape[0] in unsupported)
        raise HypernetError(
            f"layers such as {example} are {'/'.join(map(str, unsupported))} wide; this hypernetwork "
            f"supports widths {'/'.join(map(str, hypernet.widths))} "
            f"(base family {hypernet.config.base_family}). Use a hypernetwork trained for this base "
            "model, or allow the sum for those layers")
    coefficients: Coefficients = {}
    fallback = sum(content.layers[n].shape[0] in unsupported for n in names)
    # Layers of equal shapes and ranks go through H together: one batched product per group
    # instead of a few small ones per layer (280 layers fall into 2 groups for SDXL).
    groups: dict[tuple, list[str]] = {}
    dense: list[str] = []
    for name in names:
        c, s = content.layers[name], style.layers[name]
        if c.shape[0] in unsupported:
            continue
        if _concatenable(c) and _concatenable(s):
            key = (c.up.shape[0], c.down.shape[1], c.rank, s.rank, c.dtype, s.dtype)
            groups.setdefault(key, []).append(name)
        else:
            dense.append(name)
    total, done = len(names) - fallback, 0
    with torch.no_grad():
        for group in groups.values():
            for start in range(0, len(group), _BATCH):
                chunk = group[start:start + _BATCH]
                m_c, m_s = hypernet.coefficients_factored(
                    *_stacked_factors([content.layers[n] for n in chunk]),
                    *_stacked_factors([style.layers[n] for n in chunk]))
                coefficients.update((n, (m_c[i], m_s[i])) for i, n in enumerate(chunk))
                done += len(chunk)
                if progress:
                    progress(done, total)
        for name in dense:
            c, s = content.layers[name], style.layers[name]
            coefficients[name] = hypernet.coefficients_dense(c.delta().flatten(1), s.delta().flatten(1))
            done += 1
            if progress:
                progress(done, total)
    return coefficients, fallback


def assemble(content: LoraFile, style: LoraFile, coefficients: Coefficients,
             content_strength: float = 1.0, style_strength: float = 1.0,
             method: str = "lorarar") -> MergedLora:
    """Build the merged LoRA from precomputed coefficients (cheap: no hypernetwork call)."""
    report = MergeReport(method)
    layers: dict[str, MergedLayer] = {}
    for name in list(content.layers) + [n for n in style.layers if n not in content.layers]:
        sides = [(layer, strength, coefficients[name][i] if name in coefficients else None)
                 for i, (lora, strength) in enumerate(((content, content_strength), (style, style_strength)))
                 if (layer := lora.layers.get(name)) is not None]
        if len(sides) == 2:
            _check_same_shape(name, content, style)
            if name in coefficients:
                report.hypernet_layers += 1
            else:
                report.summed_layers += 1
        elif name in content.layers:
            report.content_only_layers += 1
        else:
            report.style_only_layers += 1
        if all(_concatenable(layer) for layer, _, _ in sides):
            layers[name] = MergedLayer(parts=[
                LowRankPart(layer.up, layer.down, layer.scale * strength, m) for layer, strength, m in sides])
        else:
            report.dense_layers += 1
            diff = None
            for layer, strength, m in sides:
                delta = layer.delta() * strength
                if m is not None:
                    delta = delta * m.reshape(1, -1, *([1] * (delta.dim() - 2)))
                diff = delta if diff is None else diff + delta
            layers[name] = MergedLayer(diff=diff)
    return MergedLora(layers, coefficients, report, content_strength, style_strength)


def merge(content: LoraFile, style: LoraFile, hypernet: HyperNetwork | None = None,
          content_strength: float = 1.0, style_strength: float = 1.0, method: str = "lorarar",
          unsupported_width: str = "error", progress: Progress | None = None) -> MergedLora:
    """Merge `content` and `style` with LoRA.rar (`method="lorarar"`) or the direct sum."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, not {method!r}")
    fallback = 0
    coefficients: Coefficients = {}
    if method == "lorarar":
        if hypernet is None:
            raise HypernetError("method 'lorarar' needs a hypernetwork")
        coefficients, fallback = compute_coefficients(content, style, hypernet, unsupported_width, progress)
    merged = assemble(content, style, coefficients, content_strength, style_strength, method)
    merged.report.width_fallback_layers = fallback
    if method == "lorarar" and not coefficients:
        merged.report.notes.append("no layer was merged by the hypernetwork: the two LoRAs share "
                                   "no to_q/to_out.0 attention layer")
    log.info("merge: %s", merged.report.summary())
    return merged
