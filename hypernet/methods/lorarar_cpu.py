"""LoRA.rar's coefficient pass on the CPU, arranged so the cores spend their time in the products.

The arithmetic is that of `HyperNetwork.coefficients_factored` for layers of one shape:
P = [W1_c·(s_c·up_c), W1_s·(s_s·up_s)]·[down_c; down_s] + b1 and (m_c, m_s) = W2·relu(P) + b2.
What differs is the memory traffic around it (issue 12; figures in docs/performance.md):

- each factor is converted from its file dtype to float32 once, straight into a buffer that is
  reused for every chunk of layers (one `_foreach_copy_` call per chunk), instead of being stacked,
  widened and scaled in three passes with fresh tensors per batch;
- the alpha/rank scales go onto the small (hidden × rank) products W1·up, not onto the factors;
- the (hidden × in) activations — the largest tensor — are produced a few layers at a time into
  one reused block, so the ReLU and the head read them while they are still near the cores;
- the head writes each layer's two coefficient rows into one result tensor for the group.

On the idle 2-core CPU this took SDXL's 280 rank-64 matrices from 0.33–0.37 s to 0.25–0.27 s
(medians, side by side: `python benchmarks/bench_coefficient_pass.py`).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from ..lora import LoraLayer
from ..model import HyperNetwork
from .lorarar_diagnostics import column_forms_into

# Layers whose factors are converted and pass through H's first layer together, and layers per
# block of activations. Measured side by side on the idle 2-core CPU (median share of the 2048²
# fp32 matmul rate, 13 rounds): chunks of 8/16/24/32 with blocks of 2–8 all gave 0.58–0.65, the
# previous code 0.43; 16/4 was at the top and keeps the buffers at ~25 MB for SDXL.
CHUNK = 16
BLOCK = 4

_foreach_copy = getattr(torch, "_foreach_copy_", None)  # one call for many copies (torch ≥ 2.1)


def _copy_all(targets: list[torch.Tensor], sources: list[torch.Tensor]) -> None:
    if _foreach_copy is not None:
        _foreach_copy(targets, sources)
    else:
        for target, source in zip(targets, sources):
            target.copy_(source)


def group_coefficients(hypernet: HyperNetwork, contents: list[LoraLayer], styles: list[LoraLayer],
                       progress: Callable[[int], None] | None = None,
                       measures: torch.Tensor | None = None) -> torch.Tensor:
    """(m_c, m_s) of layers that share one shape and one pair of ranks, as a (layers, 2, in)
    float32 tensor; `progress(k)` after each chunk of k layers. Call under `torch.no_grad()`.

    `measures`, a (layers, 4, in) float32 tensor, receives per column what the merge's own
    diagnostics need (lorarar_diagnostics.MEASURE_ROWS): |W1·x_j| from the activations while
    they are in cache, and the three column forms from the factors already in the buffers."""
    count = len(contents)
    out_width, rank_c = contents[0].shape[0], contents[0].rank
    in_width, rank_s = math.prod(contents[0].shape[1:]), styles[0].rank
    rank = rank_c + rank_s
    first, head = hypernet.input_layer(out_width), hypernet.output[1]
    hidden = first.weight.shape[0]
    w_c, w_s = first.weight[:, :out_width], first.weight[:, out_width:]
    bias, head_bias = first.bias[:, None], head.bias[:, None]
    if measures is not None:
        # relu(W1·x + b1) = max(W1·x, −b1) + b1: the activations stay W1·x long enough for their
        # norms to be read, and W2·b1 moves into the head's bias — no extra pass to add b1.
        neg_bias = -bias
        head_bias = head_bias + head.weight @ bias
    chunk = min(CHUNK, count)
    block = min(BLOCK, chunk)
    f32 = torch.float32
    ups_c, ups_s = torch.empty(chunk, out_width, rank_c, dtype=f32), torch.empty(chunk, out_width, rank_s, dtype=f32)
    downs = torch.empty(chunk, rank, in_width, dtype=f32)  # [down_c; down_s] per layer
    proj_c, proj_s = torch.empty(chunk, hidden, rank_c, dtype=f32), torch.empty(chunk, hidden, rank_s, dtype=f32)
    left = torch.empty(chunk, hidden, rank, dtype=f32)
    activations = torch.empty(block, hidden, in_width, dtype=f32)
    result = torch.empty(count, 2, in_width, dtype=f32)
    scales = torch.tensor([[c.scale, s.scale] for c, s in zip(contents, styles)], dtype=f32)
    targets = [list(ups_c.unbind(0)), list(ups_s.unbind(0)),
               list(downs[:, :rank_c].unbind(0)), list(downs[:, rank_c:].unbind(0))]
    for start in range(0, count, chunk):
        k = min(chunk, count - start)
        cs, ss = contents[start:start + k], styles[start:start + k]
        _copy_all([t for part in targets for t in part[:k]],
                  [layer.up.reshape(out_width, -1) for layer in cs] + [layer.up.reshape(out_width, -1) for layer in ss]
                  + [layer.down.reshape(rank_c, -1) for layer in cs] + [layer.down.reshape(rank_s, -1) for layer in ss])
        torch.bmm(w_c.expand(k, hidden, out_width), ups_c[:k], out=proj_c[:k])
        torch.bmm(w_s.expand(k, hidden, out_width), ups_s[:k], out=proj_s[:k])
        torch.mul(proj_c[:k], scales[start:start + k, 0, None, None], out=left[:k, :, :rank_c])
        torch.mul(proj_s[:k], scales[start:start + k, 1, None, None], out=left[:k, :, rank_c:])
        if measures is not None:
            column_forms_into(measures[start:start + k, 1:], ups_c[:k], ups_s[:k], downs[:k, :rank_c],
                              downs[:k, rank_c:], scales[start:start + k])
        for a in range(0, k, block):
            b = min(a + block, k)
            pre = activations[:b - a]
            if measures is None:
                torch.baddbmm(bias, left[a:b], downs[a:b], out=pre)
                pre.relu_()
            else:
                torch.bmm(left[a:b], downs[a:b], out=pre)
                # vecdot, not vector_norm: the strided norm over H's hidden units took 10× longer
                measures[start + a:start + b, 0] = torch.linalg.vecdot(pre, pre, dim=1).sqrt_()
                torch.maximum(pre, neg_bias, out=pre)
            torch.baddbmm(head_bias, head.weight.expand(b - a, 2, hidden), pre, out=result[start + a:start + b])
        if progress:
            progress(k)
    return result
