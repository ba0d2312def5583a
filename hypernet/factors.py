"""Every adapter kind the reader accepts as an exact pair of low-rank factors.

A merged LoRA file holds one adapter per layer, and the only kind every loader reads (ComfyUI,
A1111/Forge, diffusers) is the plain LoRA (up @ down). Where a layer's two sides are of different
kinds, or a method scales a side's input columns, the merge therefore needs each side as
`U @ V = ΔW` (flattened to out × in·k·k) — without ever forming ΔW:

- LoRA / LoCon: U = scale·up, V = down. Tucker LoCon (`lora_mid`): V = mid ⊗ down, rank r.
- LoHa: ΔW = scale·(A1 B1) ⊙ (A2 B2). A Hadamard product of rank-r1 and rank-r2 matrices is the
  product of their Khatri–Rao factors: U[:, (a, b)] = A1[:, a]·A2[:, b], V[(a, b), :] = B1[a, :]·B2[b, :],
  rank r1·r2 (Tucker LoHa: each of A_i B_i is first written as U_i V_i with V_i = t_i ⊗ B_i).
- LoKr: ΔW = scale·kron(W1, W2) with W_i = U_i V_i (a factor given whole is I·W or W·I, whichever is
  narrower; the second one may be a conv kernel or a Tucker product): kron(U1 V1, U2 V2) =
  kron(U1, U2)·kron(V1, V2), rank r1·r2, the conv kernel riding along in V2's columns.
- Full differences (`.diff`) have none.

Where the factors would hold at least as many numbers as ΔW (a LoKr whose second factor is given
whole, say), `factored_rank` is None and the caller keeps the dense difference. DoRA's magnitude
is not in these factors: it needs the base weight (see hypernet/merge.py).
"""

from __future__ import annotations

import math

import torch

from .lora import FULL, LOHA, LOKR, LOW_RANK, LoraLayer


def _loha_part_ranks(t: dict[str, torch.Tensor], i: str) -> int:
    return t[f"hada_w{i}_b"].shape[0] if f"hada_t{i}" not in t else t[f"hada_w{i}_a"].shape[0]


def _lokr_ranks(t: dict[str, torch.Tensor]) -> tuple[int, int]:
    if "lokr_w1" in t:
        r1 = min(t["lokr_w1"].shape)
    else:
        r1 = t["lokr_w1_a"].shape[1]
    if "lokr_w2" in t:
        w2 = t["lokr_w2"]
        r2 = min(w2.shape[0], math.prod(w2.shape[1:]))
    elif "lokr_t2" in t:
        r2 = t["lokr_w2_a"].shape[0]
    else:
        r2 = t["lokr_w2_a"].shape[1]
    return r1, r2


def factored_rank(layer: LoraLayer) -> int | None:
    """The rank of `exact_factors(layer)`, from the shapes alone; None where the layer has no
    factorisation smaller than its dense ΔW."""
    t = layer.tensors
    if layer.kind == LOW_RANK:
        rank = layer.down.shape[0] if layer.mid is None else t["mid"].shape[0]
    elif layer.kind == LOHA:
        rank = _loha_part_ranks(t, "1") * _loha_part_ranks(t, "2")
    elif layer.kind == LOKR:
        r1, r2 = _lokr_ranks(t)
        rank = r1 * r2
    else:
        return None
    out, rest = layer.shape[0], math.prod(layer.shape[1:])
    if layer.kind != LOW_RANK and rank * (out + rest) >= out * rest:
        return None
    return rank


def _matrix_factors(a: torch.Tensor | None, b: torch.Tensor | None, whole: torch.Tensor | None):
    """(U, V) of one factor of a product: given as a @ b, or whole (then I·W or W·I, narrower)."""
    if whole is None:
        return a, b.flatten(1)
    matrix = whole.flatten(1)
    rows, cols = matrix.shape
    if rows <= cols:
        return torch.eye(rows, dtype=matrix.dtype), matrix
    return matrix, torch.eye(cols, dtype=matrix.dtype)


def _tucker_factors(core: torch.Tensor, a: torch.Tensor, b: torch.Tensor):
    """LyCORIS's Tucker product einsum("ijkl,jr,ip->prkl", core, b, a) as U @ V (out × in·k·k)."""
    return a.t().contiguous(), torch.einsum("ijkl,jr->irkl", core, b).flatten(1)


def _khatri_rao(u1, v1, u2, v2):
    """(U1 V1) ⊙ (U2 V2) = U @ V."""
    u = (u1[:, :, None] * u2[:, None, :]).flatten(1)
    v = (v1[:, None, :] * v2[None, :, :]).flatten(0, 1)
    return u, v


def exact_factors(layer: LoraLayer) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(U, V) float32 with U @ V = layer.delta() flattened to (out, in·k·k), alpha/rank inside U;
    None where `factored_rank` is None. A DoRA layer's magnitude is left out (see the module)."""
    if factored_rank(layer) is None:
        return None
    t = {k: v.float() for k, v in layer.tensors.items()}
    if layer.kind == LOW_RANK:
        up = t["up"].flatten(1)
        if layer.mid is None:
            down = t["down"].flatten(1)
        else:  # Tucker LoCon: up (o, r, 1, 1), mid (r, r, k, k), down (r, i, 1, 1)
            down = torch.einsum("rskl,si->rikl", t["mid"], t["down"].flatten(1)).flatten(1)
        return up * layer.scale, down
    if layer.kind == LOHA:
        parts = []
        for i in ("1", "2"):
            if f"hada_t{i}" in t:
                parts += _tucker_factors(t[f"hada_t{i}"], t[f"hada_w{i}_a"], t[f"hada_w{i}_b"])
            else:
                parts += (t[f"hada_w{i}_a"], t[f"hada_w{i}_b"].flatten(1))
        u, v = _khatri_rao(*parts)
        return u * layer.scale, v
    if layer.kind == LOKR:
        u1, v1 = _matrix_factors(t.get("lokr_w1_a"), t.get("lokr_w1_b"), t.get("lokr_w1"))
        if "lokr_t2" in t:
            u2, v2 = _tucker_factors(t["lokr_t2"], t["lokr_w2_a"], t["lokr_w2_b"])
        else:
            u2, v2 = _matrix_factors(t.get("lokr_w2_a"), t.get("lokr_w2_b"), t.get("lokr_w2"))
        return torch.kron(u1, u2) * layer.scale, torch.kron(v1, v2)
    assert layer.kind == FULL
    return None
