"""How much a hypernetwork's output depends on its input (DESIGN §12), for one LoRA pair.

H's first layer computes W1·x + b1 on a column x = [ΔW_c[:, j]; ΔW_s[:, j]] (divided by the
layer's RMS per side when H normalises its inputs). When |W1·x| ≪ |b1| the output is nearly
H(0) = W2·relu(b1) + b2 whatever the pair: the merge is a fixed recipe. Per attention width:

- `input_over_bias`: mean over columns of ‖W1·x‖ / ‖b1‖;
- `h0_c`, `h0_s`: H(0);
- `m_c_mean/std`, `m_s_mean/std`: the coefficients over every column of every merged layer;
- `distance_from_h0`: mean |m − H(0)| over columns and both sides (near 0: H is a constant);
- `negative_m_c`: share of content coefficients below zero.
"""

from __future__ import annotations

import numpy as np
import torch

from ..lora import LoraFile
from ..methods.lorarar import is_hypernet_target
from ..model import HyperNetwork, factored_rms


@torch.no_grad()
def input_dependence(hypernet: HyperNetwork, content: LoraFile, style: LoraFile) -> dict[str, dict[str, float]]:
    """Per attention width (as a string key): the figures of the module docstring."""
    per_width: dict[int, dict[str, list]] = {}
    targets = hypernet.config.targets
    for name, c in content.layers.items():
        s = style.layers.get(name)
        if s is None or not is_hypernet_target(name, targets):
            continue
        width = c.shape[0]
        if width not in hypernet.widths:
            continue
        up_c, down_c = c.up.float().reshape(width, -1) * c.scale, c.down.float().reshape(c.rank, -1)
        up_s, down_s = s.up.float().reshape(width, -1) * s.scale, s.down.float().reshape(s.rank, -1)
        if hypernet.input_normalisation == "layer_rms":
            up_c, up_s = up_c / factored_rms(up_c, down_c), up_s / factored_rms(up_s, down_s)
        first, head = hypernet.input_layer(width), hypernet.output[1]
        w_c, w_s = first.weight[:, :width], first.weight[:, width:]
        wx = (w_c @ up_c) @ down_c + (w_s @ up_s) @ down_s                     # (hidden, in)
        m = head.weight @ torch.relu(wx + first.bias[:, None]) + head.bias[:, None]
        h0 = head.weight @ torch.relu(first.bias) + head.bias
        entry = per_width.setdefault(width, {"ratio": [], "m_c": [], "m_s": [], "h0": h0})
        entry["ratio"].append((wx.norm(dim=0) / first.bias.norm()).numpy())
        entry["m_c"].append(m[0].numpy())
        entry["m_s"].append(m[1].numpy())
    out = {}
    for width, e in sorted(per_width.items()):
        m_c, m_s, h0 = np.concatenate(e["m_c"]), np.concatenate(e["m_s"]), e["h0"].numpy()
        distance = float(np.mean(np.abs(np.concatenate([m_c - h0[0], m_s - h0[1]]))))
        out[str(width)] = {
            "input_over_bias": float(np.mean(np.concatenate(e["ratio"]))),
            "h0_c": float(h0[0]), "h0_s": float(h0[1]),
            "m_c_mean": float(m_c.mean()), "m_c_std": float(m_c.std()),
            "m_s_mean": float(m_s.mean()), "m_s_std": float(m_s.std()),
            "distance_from_h0": distance,
            "negative_m_c": float((m_c < 0).mean()),
        }
    return out


def average(records: list[dict[str, dict[str, float]]]) -> dict[str, dict[str, float]]:
    """Mean of each figure over pairs (per width)."""
    widths = sorted({w for r in records for w in r}, key=int)
    return {w: {k: float(np.mean([r[w][k] for r in records if w in r])) for k in records[0][widths[0]]}
            for w in widths} if records and widths else {}
