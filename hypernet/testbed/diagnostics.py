"""How much a testbed hypernetwork's output depends on its input (DESIGN §12), per LoRA pair.

Every `lorarar` merge already measures this (`MergedLora.contribution`, issue 17: the figures the
node's report and the CLI's `note:` show); the benchmark keeps them per pair and averages them.
Per attention width:

- `input_over_bias`: mean over columns of ‖W1·x‖ / ‖b1‖ (x as H reads it: divided by the layer's
  RMS per side when H normalises its inputs);
- `h0_c`, `h0_s`: H(0) = W2·relu(b1) + b2, H's fixed recipe;
- `m_c_mean/std`, `m_s_mean/std`: the coefficients over every column of every merged layer;
- `input_effect`: ‖M − M0‖ / ‖S‖, how much reacting to the pair changed the merged update against
  the fixed recipe (M0 = H(0)'s constant coefficients), as a share of the plain sum S (near 0: H
  is a constant recipe);
- `distance_from_sum`: ‖M − S‖ / ‖S‖;
- `negative_m_c`: share of content coefficients below zero.
"""

from __future__ import annotations

import numpy as np

from ..merged import MergedLora


def input_dependence(merged: MergedLora) -> dict[str, dict[str, float]]:
    """Per attention width (as a string key): the figures of the module docstring, read from the
    merge's own measurement (a `lorarar` merge; {} for one without it)."""
    contribution = merged.contribution
    if contribution is None:
        return {}
    return {str(width): {"input_over_bias": f.input_to_bias, "h0_c": f.h0[0], "h0_s": f.h0[1],
                         "m_c_mean": f.mean[0], "m_c_std": f.spread[0], "m_s_mean": f.mean[1], "m_s_std": f.spread[1],
                         "input_effect": f.input_effect, "distance_from_sum": f.distance_from_sum,
                         "negative_m_c": f.negative[0]}
            for width, f in sorted(contribution.widths.items())}


def average(records: list[dict[str, dict[str, float]]]) -> dict[str, dict[str, float]]:
    """Mean of each figure over pairs (per width)."""
    widths = sorted({w for r in records for w in r}, key=int)
    return {w: {k: float(np.mean([r[w][k] for r in records if w in r])) for k in records[0][widths[0]]}
            for w in widths} if records and widths else {}
