"""NP-LoRA (Chen et al., arXiv 2511.11051): project the content LoRA off the style's principal
directions, training-free.

Per layer present in both LoRAs, with c = μ/(1+μ) and V the top-k right singular vectors of ΔW_s
(k = the style rank by default):

    side "input"  (the paper's Eq. 11, the default):  ΔW_c' = ΔW_c·(I − c·V Vᵀ)
    side "output" (its Eq. 21, the left projector):  ΔW_c' = (I − c·U Uᵀ)·ΔW_c, U = left singular vectors

and the merge is ss·ΔW_s + cs·ΔW_c' (strengths after the method, docs/methods.md). μ = 0 is the plain
sum; μ → ∞ (c = 1) removes every part of the content update that reads (input side) or writes
(output side) along the style's directions.

Exact and factored for low-rank inputs (docs/cli.md, "How the merge is computed"): with ΔW_s = s·B_s·A_s, QR of B_s and of A_sᵀ
leaves an r×r core whose SVD gives U and V — no out×in matrix is formed. The content side keeps
its rank: down ← A_c − c·(A_c V)Vᵀ (input side) or up ← B_c − c·U(UᵀB_c) (output side), so the
merged result is an ordinary kohya LoRA of rank r_c + r_s. Conv layers are flattened (in·k·k).
Adapters without a low-rank form (LoHa, LoKr, DoRA, Tucker, full diffs) take the same formula on
their dense ΔW.

Text-encoder layers are projected too: the paper applies the projection to every LoRA layer, and
the formula type-checks on any Linear.
"""

from __future__ import annotations

import itertools
import math

import torch

from ..errors import LoraRarError
from ..lora import FULL, LoraFile, LoraLayer
from ..merged import MergedLora, Side, assemble
from ..progress import Progress
from ..row_blocks import cross, dense, is_row_blocks, matrix, times

SIDES = ("input", "output")
DEFAULT_MU = 0.5
# Singular directions weaker than this fraction of the strongest are the style's numerical null
# space (e.g. a LoRA whose factors are rank-deficient): they carry no style, and their vectors
# are arbitrary, so they are not projected out.
NULL_RTOL = 1e-4


def projection_strength(mu: float) -> float:
    """c = μ/(1+μ) ∈ [0, 1]; μ = inf is the hard projection (c = 1)."""
    if not isinstance(mu, (int, float)) or math.isnan(mu) or mu < 0:
        raise LoraRarError(f"np-lora: mu must be a number >= 0 (0 = plain sum, large = hard projection), got {mu!r}")
    return 1.0 if math.isinf(mu) else mu / (1.0 + mu)


def parse_rank(rank) -> int | None:
    """k from the user: None / 'all' = the style's rank; else a whole number >= 1."""
    if rank is None or (isinstance(rank, str) and rank.strip().lower() in ("", "all")):
        return None
    try:
        value = int(str(rank).strip())
    except ValueError:
        value = 0
    if value < 1 or str(value) != str(rank).strip():
        raise LoraRarError(f"np-lora: rank must be 'all' (the style LoRA's rank) or a whole number >= 1, got {rank!r}")
    return value


def _matrix(tensor: torch.Tensor) -> torch.Tensor:
    """A factor or ΔW as a float32 matrix: (rows, everything else) — conv kernels flattened."""
    return tensor.float().reshape(tensor.shape[0], -1)


def _gram(rows: torch.Tensor) -> torch.Tensor:
    """rows·rowsᵀ in float64 for an (r, D) factor: the r×r Gram that carries its singular values
    squared (float32 products are exact in float64, so the small ones survive)."""
    rows = rows.double()
    return rows @ rows.T


def right_singular(h: torch.Tensor, g: torch.Tensor, k: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """For ΔW = B·A given only h = A·Aᵀ and g = BᵀB (batches of r×r, float64): X with the top-k
    right singular vectors V = Aᵀ·X as columns, and the singular values (descending, up to the
    factors' scale). Columns beyond k, or in the numerical null space, are zero.

    With h = E·Λ·Eᵀ, A = (E·Λ^½)·Qᵀ for the orthonormal Q = Aᵀ·E·Λ^-½, so ΔW = (B·E·Λ^½)·Qᵀ and
    V = Q·W, where W are the eigenvectors of the core Λ^½·Eᵀ·g·E·Λ^½ (its eigenvalues are σ²)."""
    lam, e = torch.linalg.eigh(h)
    kept = lam > lam[..., -1:] * 1e-14          # A's own numerical rank (float64 Gram)
    root = torch.where(kept, lam.clamp_min(0).sqrt(), torch.zeros_like(lam))
    inverse_root = torch.where(kept, 1.0 / root.clamp_min(1e-300), torch.zeros_like(lam))
    scaled = e * root.unsqueeze(-2)
    eigenvalues, w = torch.linalg.eigh(scaled.transpose(-1, -2) @ g @ scaled)
    sigma = eigenvalues.flip(-1).clamp_min(0).sqrt()
    x = (e * inverse_root.unsqueeze(-2)) @ w.flip(-1)
    use = sigma > sigma[..., :1] * NULL_RTOL
    if k is not None:
        use &= torch.arange(sigma.shape[-1]) < k
    return x * use.unsqueeze(-2), sigma


def _project_low_rank(c_up, c_down, s_up, s_down, strength, k, side, out=None):
    """float32 factor matrices of both sides → (the new content factor, the removed share).
    Only r×r matrices and products with the factors: no out×in matrix. The style's Grams are
    float64 (they carry its small singular values); the rest is float32. An up may be a
    `RowBlocks` (pieces of a fused weight): its products are taken piece by piece."""
    h_s, g_s = _gram(s_down), cross(s_up, s_up, torch.float64)
    h_c, g_c = c_down @ c_down.T, cross(c_up, c_up)                    # for the report only
    norm = float((g_c * h_c).sum().clamp_min(0).sqrt())               # ‖B_c·A_c‖ / s_c
    if side == "input":
        x, _ = right_singular(h_s, g_s, k)                              # V = A_sᵀ·x
        x = x.float()
        coords = (c_down @ s_down.T) @ x                                # A_c·V
        new = torch.sub(c_down, (coords @ x.T) @ s_down, alpha=strength, out=_out(out, c_down))
        removed = float((coords * (g_c @ coords)).sum())               # ‖B_c·A_c·V‖²
    else:
        x, _ = right_singular(g_s, h_s, k)                              # U = B_s·x (ΔWᵀ = A_sᵀ·B_sᵀ)
        x = x.float()
        coords = x.T @ cross(s_up, c_up)                                # Uᵀ·B_c
        c_up = matrix(c_up)                                             # the new up is dense
        new = torch.sub(c_up, times(s_up, x @ coords), alpha=strength, out=_out(out, c_up))
        removed = float((coords * (coords @ h_c)).sum())               # ‖Uᵀ·B_c·A_c‖²
    return new, (strength * math.sqrt(max(removed, 0.0)) / norm if norm > 0 else 0.0)


def style_directions(style: Side, side: str, k: int | None) -> torch.Tensor:
    """The style's top-k singular vectors as columns: right ones (in·k·k, k') for the input side,
    left ones (out, k') for the output side; the numerical null space is left out."""
    factors = _factor_matrices(style)
    if factors is not None:
        up, down = factors
        if side == "input":
            x, sigma = right_singular(_gram(down), cross(up, up, torch.float64), k)
            vectors = down.T.double() @ x
        else:
            x, sigma = right_singular(cross(up, up, torch.float64), _gram(down), k)
            vectors = times(up, x)
    else:
        u, sigma, vh = torch.linalg.svd(_matrix(style.delta()).double(), full_matrices=False)
        vectors = vh.T if side == "input" else u
        use = sigma > sigma[:1] * NULL_RTOL
        if k is not None:
            use &= torch.arange(sigma.numel()) < k
        vectors = vectors * use
    return vectors[:, vectors.abs().sum(dim=0) > 0].float()


def _factor_matrices(side: Side) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(up, down) as float32 matrices whose product is the side's ΔW up to its scale: a LoRA's own
    factors (scale outside; an up held as `RowBlocks` stays so), any other adapter's exact
    factors (hypernet/factors.py: LoHa, LoKr, Tucker; scale inside); None for a full difference."""
    if side.is_low_rank:
        return (side.up if is_row_blocks(side.up) else _matrix(side.up)), _matrix(dense(side.down))
    return side.factors()


def _out(out: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor | None:
    return None if out is None else out.view(like.shape)


def project_content(content: Side, style: Side, strength: float, k: int | None, side: str,
                    out: torch.Tensor | None = None) -> tuple[Side, float]:
    """One layer: (the projected content side, the share ‖ΔW_c − ΔW_c'‖/‖ΔW_c‖ it removed). Sides
    with factors — LoRAs and LoHa/LoKr/Tucker alike — are projected in factored form and stay a
    LoRA of the same rank; only a full difference on either side needs the dense formula."""
    c, s = _factor_matrices(content), _factor_matrices(style)
    if c is not None and s is not None:
        new, share = _project_low_rank(*c, *s, strength, k, side, out if content.is_low_rank else None)
        if content.is_low_rank:
            if side == "input":
                return Side(content.up, new.reshape(content.down.shape), content.scale), share
            return Side(new.reshape(content.up.shape), content.down, content.scale), share
        shape, rank = content.shape, c[0].shape[1]
        up, down = (c[0], new) if side == "input" else (new, c[1])
        return Side(up.reshape(shape[0], rank, *[1] * (len(shape) - 2)), down.reshape(rank, *shape[1:]), 1.0), share
    directions = style_directions(style, side, k)
    delta = content.delta()
    matrix = _matrix(delta)
    if side == "input":
        part = (matrix @ directions) @ directions.T
    else:
        part = directions @ (directions.T @ matrix)
    norm = float(matrix.norm())
    projected = Side.of(LoraLayer(FULL, {"diff": (matrix - strength * part).reshape(delta.shape)}))
    return projected, (strength * float(part.norm()) / norm if norm > 0 else 0.0)


def _new_factor_size(content: Side, side: str) -> int:
    """Elements of the factor NP-LoRA replaces in a plain-LoRA content side (down for the input
    side, up for the output side); 0 for other sides (their new factors are made as they are)."""
    if not content.is_low_rank:
        return 0
    return math.prod((content.down if side == "input" else content.up).shape)


def np_lora_merge(content: LoraFile, style: LoraFile, mu: float = DEFAULT_MU, rank=None, side: str = "input",
                  progress: Progress | None = None) -> MergedLora:
    """The strength-free NP-LoRA merge; `layer_values` holds each layer's removed share."""
    strength = projection_strength(mu)
    k = parse_rank(rank)
    if side not in SIDES:
        raise LoraRarError(f"np-lora: side must be one of {', '.join(SIDES)}, got {side!r}")
    merged = assemble(content, style, method="np-lora",
                      method_label=f"projected off the style's principal directions ({side} side)")
    shared = [name for name, layer in merged.layers.items() if layer.content is not None and layer.style is not None]
    if strength == 0.0:
        merged.report.notes.append("np-lora with mu = 0 is the plain sum: nothing was projected")
        return merged
    clamped = sum(1 for n in shared if k is not None and merged.layers[n].style.is_low_rank
                  and k > merged.layers[n].style.rank)
    # The projected factors (float32) of all plain-LoRA content sides go into one buffer: allocated
    # between the per-layer temporaries, they would pin their freed heap memory (measured on Flux:
    # 50 MB kept on top of the 107 MB of factors, benchmarks/bench_families.py)
    sizes = {n: _new_factor_size(merged.layers[n].content, side) for n in shared}
    buffer = torch.empty(sum(sizes.values()), dtype=torch.float32)
    offsets = dict(zip(sizes, itertools.accumulate([0, *sizes.values()])))
    with torch.no_grad():
        for done, name in enumerate(shared, start=1):
            layer = merged.layers[name]
            out = buffer[offsets[name]:offsets[name] + sizes[name]] if sizes[name] else None
            layer.content, merged.layer_values[name] = project_content(layer.content, layer.style, strength, k, side,
                                                                       out)
            if progress:
                progress(done, len(shared))
    merged.report.method_layers, merged.report.summed_layers = len(shared), 0
    if clamped:
        merged.report.notes.append(f"np-lora: rank {k} exceeds the style LoRA's rank in {clamped} layers; "
                                   "all of their style directions were used")
    return merged
