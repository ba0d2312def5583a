"""The method registry (hypernet/merge.py) is the one place a method and its settings are
described: the CLI's options, the merge node's widgets and how their values reach `merge` are made
from it, so a method added there appears everywhere, and the existing surfaces are what they were."""

from __future__ import annotations

import pytest

from hypernet import merge as merge_mod
from hypernet.cli import build_parser
from hypernet.cli.merge import method_params
from hypernet.errors import LoraRarError
from hypernet.merge import REGISTRY, Method, Param, Widget, widgets
from hypernet.nodelogic.merge import node_params


def test_the_node_widgets_keep_their_names_and_order():
    """Saved workflows store widget values by position: the registry's order is the node's."""
    assert [p.widget.name for _, _, p in widgets()] == ["mu", "np_rank", "np_side", "k_top_k", "k_alpha", "k_beta"]


def test_the_cli_options_are_the_registry_s_flags():
    parser = build_parser()
    args = parser.parse_args(["merge", "c.safetensors", "s.safetensors", "-o", "o.safetensors", "--method", "np-lora",
                              "--mu", "2", "--np-rank", "4", "--np-side", "output"])
    assert method_params(args) == {"mu": 2.0, "rank": "4", "side": "output"}
    args = parser.parse_args(["merge", "c", "s", "-o", "o", "--method", "lorarar", "--allow-width-fallback"])
    assert method_params(args) == {"unsupported_width": "sum"}
    args = parser.parse_args(["merge", "c", "s", "-o", "o", "--method", "sum", "--k-beta", "0.3"])
    with pytest.raises(LoraRarError, match=r"--k-beta is a setting of --method k-lora, not of --method sum"):
        method_params(args)


def test_a_method_registered_once_appears_on_the_cli_and_the_node(monkeypatch):
    def run(content, style, hypernet, params, progress):
        return merge_mod.assemble(content, style, method="half")

    half = Method("half", "half of each side (a test method)", False, run, params={
        "weight": Param(0.5, float, "each side's weight", flag="--half-weight", metavar="W",
                        widget=Widget("half_weight", "float", 0.5, "half only: each side's weight", 0.0, 1.0, 0.1)),
        "device": Param("cpu", str, "where it runs", device=True)})
    monkeypatch.setitem(REGISTRY, "half", half)
    args = build_parser().parse_args(["merge", "c", "s", "-o", "o", "--method", "half", "--half-weight", "0.25"])
    assert method_params(args) == {"weight": 0.25}
    assert [p.widget.name for _, _, p in widgets()][-1] == "half_weight"  # a new widget goes at the end
    assert node_params("half", {"half_weight": 0.3, "mu": 2.0}, device="cuda:0") == {"weight": 0.3, "device": "cuda:0"}
    assert node_params("np-lora", {"half_weight": 0.3, "np_rank": 0}) == {"rank": None}
