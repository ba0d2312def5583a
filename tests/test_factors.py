"""hypernet.factors: every adapter kind the reader accepts, as exact low-rank factors — checked
against each layer's dense ΔW (LoraLayer.delta, the reader's own product), linear and conv,
plain and Tucker; and the rank is known from the shapes before anything is formed."""

from __future__ import annotations

import math

import pytest
import torch

from hypernet.factors import exact_factors, factored_rank
from hypernet.lora import LOHA, LOKR, LOW_RANK, LoraLayer


def rand(*shape, seed=[0]):  # noqa: B006 - a counter: every tensor of a test gets new values
    seed[0] += 1
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed[0]), dtype=torch.float64).float()


CASES = {
    "lora linear": (LOW_RANK, {"up": rand(64, 4), "down": rand(4, 48)}, 2.0),
    "locon conv 3x3": (LOW_RANK, {"up": rand(32, 4, 1, 1), "down": rand(4, 16, 3, 3)}, 4.0),
    "locon tucker": (LOW_RANK, {"up": rand(32, 4, 1, 1), "mid": rand(4, 4, 3, 3), "down": rand(4, 16, 1, 1)}, 2.0),
    "loha linear": (LOHA, {"hada_w1_a": rand(96, 4), "hada_w1_b": rand(4, 80), "hada_w2_a": rand(96, 4),
                           "hada_w2_b": rand(4, 80)}, 2.0),
    "loha unequal ranks": (LOHA, {"hada_w1_a": rand(96, 3), "hada_w1_b": rand(3, 80), "hada_w2_a": rand(96, 5),
                                  "hada_w2_b": rand(5, 80)}, None),
    "loha conv (flat)": (LOHA, {"hada_w1_a": rand(32, 2), "hada_w1_b": rand(2, 16 * 9), "hada_w2_a": rand(32, 2),
                                "hada_w2_b": rand(2, 16 * 9)}, 1.0),
    "loha tucker": (LOHA, {"hada_t1": rand(3, 3, 3, 3), "hada_w1_a": rand(3, 32), "hada_w1_b": rand(3, 24),
                           "hada_t2": rand(3, 3, 3, 3), "hada_w2_a": rand(3, 32), "hada_w2_b": rand(3, 24)}, 3.0),
    "lokr factored": (LOKR, {"lokr_w1_a": rand(8, 2), "lokr_w1_b": rand(2, 8), "lokr_w2_a": rand(80, 4),
                             "lokr_w2_b": rand(4, 80)}, 4.0),
    "lokr w1 whole": (LOKR, {"lokr_w1": rand(4, 8), "lokr_w2_a": rand(160, 4), "lokr_w2_b": rand(4, 80)}, 2.0),
    "lokr conv": (LOKR, {"lokr_w1": rand(4, 4), "lokr_w2_a": rand(8, 2), "lokr_w2_b": rand(2, 6 * 9)}, 2.0),
    "lokr tucker conv": (LOKR, {"lokr_w1": rand(2, 2), "lokr_t2": rand(2, 2, 3, 3), "lokr_w2_a": rand(2, 40),
                                "lokr_w2_b": rand(2, 24)}, 1.0),
}


@pytest.mark.parametrize("case", CASES)
def test_factors_multiply_to_the_layers_own_delta(case):
    kind, tensors, alpha = CASES[case]
    layer = LoraLayer(kind, tensors, alpha)
    rank = factored_rank(layer)
    u, v = exact_factors(layer)
    assert u.shape == (layer.shape[0], rank) and v.shape == (rank, math.prod(layer.shape[1:]))
    dense = layer.delta().double().flatten(1)
    product = u.double() @ v.double()
    assert (product - dense).abs().max() <= 1e-5 * dense.abs().max(), case
    # a wrong scale or one factor transposed would not pass
    assert layer.scale == 1.0 or (product / layer.scale - dense).abs().max() > 1e-3 * dense.abs().max()


def test_no_factors_where_they_would_be_larger_than_the_difference():
    whole = LoraLayer(LOKR, {"lokr_w1": rand(8, 8), "lokr_w2": rand(80, 80)}, None)  # kron of two full matrices
    assert factored_rank(whole) is None and exact_factors(whole) is None
    diff = LoraLayer("full", {"diff": rand(64, 64)}, None)
    assert factored_rank(diff) is None and exact_factors(diff) is None
    # a LoRA is always kept as it is, whatever its rank
    assert factored_rank(LoraLayer(LOW_RANK, {"up": rand(8, 8), "down": rand(8, 8)}, None)) == 8
