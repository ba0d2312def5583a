"""LoRA.rar (Shenaj et al., ICCV 2025): the hypernetwork predicts per-column merge coefficients.

Per target layer (`to_q`, `to_out.0` of attn1/attn2 by default) with updates ΔW_c and ΔW_s,
(m_c[j], m_s[j]) = H([ΔW_c[:, j]; ΔW_s[:, j]]) for every input column j, and the merged update is
ΔW_c·diag(m_c) + ΔW_s·diag(m_s); every other layer is summed (DESIGN §4). H sees the LoRAs as their
files define them (alpha/rank applied), never the strengths (DESIGN §10).

H's first layer is linear, so its pre-activation for all columns is computed from the factors
(`HyperNetwork.coefficients_factored`; on the CPU the same products in reused buffers,
`lorarar_cpu.group_coefficients`) — no out×in matrix for low-rank inputs (DESIGN §5).
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable

import torch

from .. import naming
from ..devices import full_float32_matmuls, resolve_device
from ..errors import HypernetError, LoraRarError
from ..lora import LoraFile, LoraLayer
from ..merged import Coefficients, MergedLora, assemble, check_same_shape
from ..model import HyperNetwork
from .lorarar_cpu import group_coefficients

Progress = Callable[[int, int], None]
WIDTH_POLICIES = ("error", "sum")


def is_hypernet_target(name: str, targets: tuple[str, ...]) -> bool:
    if naming.is_text_encoder(name):
        return False
    return any(re.search(rf"\.attn[12]\.{re.escape(t)}$", name) for t in targets)


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
                                   device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(m_c, m_s) of layers of one shape and pair of ranks in one batched call of H on `device`."""
    return hypernet.coefficients_factored(*_stacked_factors(contents, device), *_stacked_factors(styles, device))


def shape_groups(content: LoraFile, style: LoraFile, names: list[str]) -> tuple[dict[tuple, list[str]], list[str]]:
    """`names` as groups that go through H together — factored layers of equal shapes, ranks and
    dtypes (SDXL's 280 fall into 2): on the CPU in reused buffers a chunk at a time (lorarar_cpu),
    elsewhere in one call — and the layers H has to see as dense ΔW."""
    groups: dict[tuple, list[str]] = {}
    dense: list[str] = []
    for name in names:
        c, s = content.layers[name], style.layers[name]
        if _factored(c) and _factored(s):
            groups.setdefault((c.up.shape[0], c.down.shape[1], c.rank, s.rank, c.dtype, s.dtype), []).append(name)
        else:
            dense.append(name)
    return groups, dense


def compute_coefficients(content: LoraFile, style: LoraFile, hypernet: HyperNetwork,
                         unsupported_width: str = "error", progress: Progress | None = None,
                         device: str | None = None) -> tuple[Coefficients, int]:
    """(m_c, m_s) for every layer the hypernetwork merges; also how many layers were left to the
    sum because H has no input layer for their width (only with unsupported_width="sum").

    `device` ('cpu' default, 'cuda', …): where H runs — a copy of H (its ~0.5 M weights) and the
    factors H needs go there, products in full float32; the coefficients come back to the CPU."""
    where = resolve_device(device, "lorarar")
    if unsupported_width not in WIDTH_POLICIES:
        raise LoraRarError(f"unsupported_width: expected one of {', '.join(WIDTH_POLICIES)}, got {unsupported_width!r}")
    targets = hypernet.config.targets
    names = [n for n in content.layers if n in style.layers and is_hypernet_target(n, targets)]
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
    coefficients: Coefficients = {}
    fallback = sum(content.layers[n].shape[0] in unsupported for n in names)
    groups, dense = shape_groups(content, style, [n for n in names if content.layers[n].shape[0] not in unsupported])
    total, done = len(names) - fallback, 0
    # the buffered CPU pass reads raw factors; an H with normalised inputs goes through its own method
    on_cpu = where.type == "cpu" and hypernet.input_normalisation == "none"
    net = hypernet if on_cpu else copy.deepcopy(hypernet).to(where)  # the caller's H stays where it is
    results: list[tuple[list[str], torch.Tensor, torch.Tensor]] = []

    def advance(count: int) -> None:
        nonlocal done
        done += count
        if progress:
            progress(done, total)

    with torch.no_grad(), full_float32_matmuls(where):
        for group in groups.values():
            if on_cpu:
                m = group_coefficients(net, [content.layers[n] for n in group], [style.layers[n] for n in group],
                                       progress=advance)
                results.append((group, m[:, 0], m[:, 1]))
            else:  # on an accelerator kernel launches are the cost: each group in one call (SDXL: 2)
                results.append((group, *accelerator_group_coefficients(
                    net, [content.layers[n] for n in group], [style.layers[n] for n in group], where)))
                advance(len(group))
        for name in dense:
            c, s = content.layers[name], style.layers[name]
            m_c, m_s = net.coefficients_dense(c.delta().flatten(1).to(where), s.delta().flatten(1).to(where))
            results.append(([name], m_c[None], m_s[None]))
            advance(1)
    for chunk, m_c, m_s in results:  # back to the CPU only now: one wait for the device, not one per group
        m_c, m_s = m_c.cpu(), m_s.cpu()
        coefficients.update((n, (m_c[i], m_s[i])) for i, n in enumerate(chunk))
    return coefficients, fallback


def lorarar_merge(content: LoraFile, style: LoraFile, hypernet: HyperNetwork, unsupported_width: str = "error",
                  progress: Progress | None = None, device: str | None = None) -> MergedLora:
    """The strength-free LoRA.rar merge of `content` and `style`; H runs on `device`."""
    coefficients, fallback = compute_coefficients(content, style, hypernet, unsupported_width, progress, device)
    merged = assemble(content, style, coefficients, method="lorarar", method_label="merged by the hypernetwork")
    merged.report.width_fallback_layers = fallback
    if not coefficients:
        merged.report.notes.append("no layer was merged by the hypernetwork: the two LoRAs share "
                                   "no to_q/to_out.0 attention layer")
    return merged
