"""The factors of a LoRA made of row pieces of one fused weight, held as the pieces themselves.

A trainer that writes one LoRA per projection of a fused weight (diffusers' to_q, to_k, to_v of
Flux's `img_attn.qkv`; its q, k, v and MLP input of `single_blocks.N.linear1`) describes one
block-sparse LoRA of the whole weight: ΔW = up @ down with down the pieces' downs stacked and up
each piece's up in that piece's rows and columns, zeros elsewhere (rank = the sum of the pieces'
ranks; exact). Formed densely, that up is mostly zeros — Flux's linear1 as 21504 × 64 for four
pieces of 3072..12288 × 16 — and for a whole file it held more memory than the file's tensors.

`RowBlocks` holds only the pieces' ups (the file's own tensors where no scale had to be applied)
with their row and column ranges; `Stacked` holds the pieces' downs without copying them into one
tensor (a file's tensors share one buffer, so a stacked copy would be held on top of it). The
maths the merges need works on the pieces: `times` (up @ X), `cross` (aᵀ·b: NP-LoRA's Grams,
block-diagonal for disjoint pieces), `add_product` (ΔW += f · up @ down), `rows_of`; `dense`
forms the padded matrix (or the stacked down) for a consumer that needs one, a layer at a time and
never kept for all layers. Every function also takes a plain tensor, so callers need not ask which
form they have.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True, eq=False)
class RowBlocks:
    """A block-sparse up factor: `blocks[i]` (rows × columns[, 1, 1]) sits at rows `rows[i]` and
    columns `columns[i]` (each a [start, stop) range) of the dense up of shape `shape`; zeros
    elsewhere. Blocks of different pieces have disjoint columns; rows may overlap (a LoRA of the
    whole weight beside one of a part of it)."""

    blocks: tuple[torch.Tensor, ...]
    rows: tuple[tuple[int, int], ...]
    columns: tuple[tuple[int, int], ...]
    shape: tuple[int, ...]            # (fused rows, Σ ranks[, 1, 1]) of the dense up
    pieces: tuple[torch.Tensor, ...]  # the tensors held: each piece's up, which its blocks view

    @property
    def dtype(self) -> torch.dtype:
        return self.blocks[0].dtype

    @property
    def device(self) -> torch.device:
        return self.blocks[0].device

    def dim(self) -> int:
        return len(self.shape)

    def numel(self) -> int:
        """Elements of the dense up this stands for (what a reader's size limits count)."""
        return math.prod(self.shape)

    def parts(self, dtype: torch.dtype | None = None, device=None):
        """(block as a 2-D matrix, (row start, stop), (column start, stop)) of every block."""
        for block, rows, columns in zip(self.blocks, self.rows, self.columns):
            yield block.to(device, dtype or block.dtype).flatten(1), rows, columns


@dataclass(frozen=True, eq=False)
class Stacked:
    """A down factor held as the pieces it stacks along its first dimension (the rank): piece i is
    the down of the i-th piece of the `RowBlocks` up beside it."""

    pieces: tuple[torch.Tensor, ...]

    @property
    def shape(self) -> tuple[int, ...]:
        return (sum(p.shape[0] for p in self.pieces), *self.pieces[0].shape[1:])

    @property
    def dtype(self) -> torch.dtype:
        return self.pieces[0].dtype

    def dim(self) -> int:
        return self.pieces[0].dim()

    def numel(self) -> int:
        return math.prod(self.shape)


def of_pieces(ups: list[torch.Tensor], rows_of: list[list[int]], total: int) -> RowBlocks:
    """The block-sparse up of pieces `ups[i]` placed at the fused weight's rows `rows_of[i]`
    (in the piece's row order; split into runs of consecutive rows) side by side in columns."""
    blocks, rows, columns = [], [], []
    column = 0
    for up, piece_rows in zip(ups, rows_of):
        rank = up.shape[1]
        offset = 0
        for start, length in _runs(piece_rows):
            blocks.append(up[offset:offset + length])
            rows.append((start, start + length))
            columns.append((column, column + rank))
            offset += length
        column += rank
    return RowBlocks(tuple(blocks), tuple(rows), tuple(columns), (total, column, *ups[0].shape[2:]), tuple(ups))


def _runs(rows: list[int]) -> list[tuple[int, int]]:
    """(start, length) of each run of consecutive rows."""
    if rows == list(range(rows[0], rows[0] + len(rows))):  # one run (a part's rows): compared in C
        return [(rows[0], len(rows))]
    runs: list[tuple[int, int]] = []
    for row in rows:
        if runs and runs[-1][0] + runs[-1][1] == row:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((row, 1))
    return runs


def is_row_blocks(factor) -> bool:
    """Whether a factor is a `RowBlocks`. Asked by what it holds, not by class: inside ComfyUI the
    pack's modules may be loaded twice (as `hypernet` by a caller and under the custom node's
    package name), and a factor made by one copy reaches the other's functions."""
    return not isinstance(factor, torch.Tensor) and hasattr(factor, "blocks")


def is_stacked(factor) -> bool:
    """Whether a factor is a `Stacked` down (asked as `is_row_blocks` asks)."""
    return not isinstance(factor, torch.Tensor) and hasattr(factor, "pieces") and not hasattr(factor, "blocks")


def dense(up, dtype: torch.dtype | None = None, device=None) -> torch.Tensor:
    """An up (or a down) as a dense tensor of its own shape (a plain tensor: itself, or converted)."""
    if isinstance(up, torch.Tensor):
        return up if dtype is None and device is None else up.to(device, dtype or up.dtype)
    if is_stacked(up):
        return torch.cat([p.to(device, dtype or p.dtype) for p in up.pieces])
    out = torch.zeros(up.shape[:2], dtype=dtype or up.dtype, device=device)
    for block, (r0, r1), (c0, c1) in up.parts(out.dtype, device):
        out[r0:r1, c0:c1] = block
    return out.reshape(up.shape)


def matrix(up, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The up as a dense 2-D (out, rank) matrix in `dtype`."""
    return dense(up, dtype).reshape(up.shape[0], -1)


def times(up, x: torch.Tensor) -> torch.Tensor:
    """up @ x for x (rank, n), in x's dtype and on x's device."""
    if isinstance(up, torch.Tensor):
        return up.to(x.device, x.dtype).reshape(up.shape[0], -1) @ x
    out = x.new_zeros(up.shape[0], x.shape[1])
    for block, (r0, r1), (c0, c1) in up.parts(x.dtype, x.device):
        out[r0:r1].addmm_(block, x[c0:c1])
    return out


def add_product(out: torch.Tensor, up, down: torch.Tensor, factor: float = 1.0) -> torch.Tensor:
    """out += factor · up @ down in place, for a 2-D `out` (rows, n) and `down` (rank, n)."""
    if isinstance(up, torch.Tensor):
        return out.addmm_(up.to(out.device, out.dtype).reshape(up.shape[0], -1), down, alpha=factor)
    for block, (r0, r1), (c0, c1) in up.parts(out.dtype, out.device):
        out[r0:r1].addmm_(block, down[c0:c1], alpha=factor)
    return out


def cross(a, b, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """aᵀ·b of two ups (or any (rows, n) matrices) over the same rows, as (rank_a, rank_b) in
    `dtype`: only overlapping blocks meet (pieces of disjoint rows give a block-diagonal Gram)."""
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        a, b = a.to(dtype).reshape(a.shape[0], -1), b.to(dtype).reshape(b.shape[0], -1)
        return a.T @ b
    if isinstance(a, torch.Tensor):
        return cross(b, a, dtype).T
    if isinstance(b, torch.Tensor):
        b = b.to(dtype).reshape(b.shape[0], -1)
        out = torch.zeros(a.shape[1], b.shape[1], dtype=dtype, device=b.device)
        for block, (r0, r1), (c0, c1) in a.parts(dtype):
            out[c0:c1].addmm_(block.T, b[r0:r1])
        return out
    out = torch.zeros(a.shape[1], b.shape[1], dtype=dtype)
    others = list(b.parts(dtype))
    for block, (r0, r1), (c0, c1) in a.parts(dtype):
        for other, (s0, s1), (d0, d1) in others:
            low, high = max(r0, s0), min(r1, s1)
            if low < high:
                out[c0:c1, d0:d1].addmm_(block[low - r0:high - r0].T, other[low - s0:high - s0])
    return out


def rows_of(up, start: int, stop: int | None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Rows [start, stop) of the up as a dense 2-D matrix in `dtype` (only those rows formed)."""
    if isinstance(up, torch.Tensor):
        return up[start:stop].to(dtype).reshape(-1, math.prod(up.shape[1:]))
    stop = up.shape[0] if stop is None else stop
    out = torch.zeros(max(0, stop - start), up.shape[1], dtype=dtype)
    for block, (r0, r1), (c0, c1) in up.parts(dtype):
        low, high = max(r0, start), min(r1, stop)
        if low < high:
            out[low - start:high - start, c0:c1] = block[low - r0:high - r0]
    return out


# The tags of `packed` forms: what a factor held as pieces becomes inside a container that walks
# tuples and copies each tensor it finds (ComfyUI's dynamic-VRAM prefetch rebuilds a weight adapter
# as `type(a)(a.loaded_keys, <a.weights with every tensor copied into one VRAM buffer>)` and passes
# anything else through unchanged — a `RowBlocks` object would stay behind in CPU memory).
PACKED_ROW_BLOCKS, PACKED_STACKED = "lorarar.row_blocks", "lorarar.stacked"


def packed(factor):
    """A factor as nested tuples of tensors, ints and one tag (a plain tensor stays itself);
    `unpacked` gives it back."""
    if isinstance(factor, torch.Tensor):
        return factor
    if is_row_blocks(factor):
        return (PACKED_ROW_BLOCKS, tuple(factor.blocks), factor.rows, factor.columns, tuple(factor.shape))
    if is_stacked(factor):
        return (PACKED_STACKED, tuple(factor.pieces))
    raise TypeError(f"not a LoRA factor: {type(factor).__name__}")


def unpacked(value):
    """The factor a `packed` value stands for (its tensors wherever the container put them)."""
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)) and value and value[0] == PACKED_ROW_BLOCKS:
        _, blocks, rows, columns, shape = value
        blocks = tuple(blocks)
        return RowBlocks(blocks, tuple(map(tuple, rows)), tuple(map(tuple, columns)), tuple(shape), blocks)
    if isinstance(value, (tuple, list)) and value and value[0] == PACKED_STACKED:
        return Stacked(tuple(value[1]))
    raise TypeError(f"not a packed LoRA factor: {type(value).__name__}")
