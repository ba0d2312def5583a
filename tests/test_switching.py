"""K-LoRA's state machine during sampling (hypernet.nodelogic.switching), with a stand-in patcher:
the calls ComfyUI makes (pre-run, prepare-state before each model call in both of its call forms,
cleanup), the order in which layers move, what an interrupted run leaves, and that every layer
is back on its content side after sampling. The ComfyUI backends themselves run in the real-
ComfyUI tests (tests/integration/test_methods.py) and in tests/test_comfy_contract.py."""

from __future__ import annotations

import pytest
import torch

from hypernet.nodelogic.switching import KLoraSwitcher, SwitchTimeline, sigma_of

POINTS = {"a": 0.6, "b": 0.1, "c": 0.35, "d": 0.1, "e": 0.9}
KEYS = {module: f"diffusion_model.{module}.weight" for module in POINTS}


def sigma_at(p: float) -> float:
    return 10.0 * (1.0 - p)  # a made-up monotone schedule


class StandInBackend:
    """Records every move; holds which weight is on which side, as a real backend's model would."""

    def __init__(self):
        self.side = {key: "content" for key in KEYS.values()}
        self.log: list[tuple[str, str]] = []
        self.begun = self.ended = 0

    def percent_to_sigma(self, patcher):
        return sigma_at

    def begin(self, patcher, keys):
        assert all(side == "content" for side in self.side.values()), "a run began with switched layers"
        self.begun += 1

    def end(self, patcher):
        self.ended += 1

    def to_style(self, patcher, key):
        assert self.side[key] == "content", f"{key} moved to style twice"
        self.side[key] = "style"
        self.log.append(("style", key))

    def to_content(self, patcher, key):
        self.side[key] = "content"  # harmless when already there (see SwitchBackend)
        self.log.append(("content", key))


@pytest.fixture()
def machine():
    backend = StandInBackend()
    return KLoraSwitcher(SwitchTimeline(POINTS), KEYS, backend), backend


def expected_sides(p: float) -> dict[str, str]:
    return {KEYS[m]: ("style" if p >= point else "content") for m, point in POINTS.items()}


@pytest.mark.parametrize("call_form", ["2024-2026-05", "2026-05-and-later", "keywords"])
def test_each_call_has_exactly_the_layers_past_their_point_on_style(machine, call_form):
    switcher, backend = machine
    patcher = object()
    switcher.on_pre_run(patcher)
    for p in (0.0, 0.05, 0.1, 0.2, 0.35, 0.5, 0.6, 0.75, 0.95, 1.0):
        timestep = torch.tensor([sigma_at(p), sigma_at(p)])
        if call_form == "2024-2026-05":
            switcher.on_prepare_state(patcher, timestep)
        elif call_form == "2026-05-and-later":
            switcher.on_prepare_state(patcher, timestep, {"transformer_options": {}})
        else:
            switcher.on_prepare_state(patcher, timestep, model_options={})
        assert backend.side == expected_sides(p), p
    switcher.on_cleanup(patcher)
    assert set(backend.side.values()) == {"content"} and backend.ended == 1


def test_layers_move_once_in_timeline_order_and_back(machine):
    switcher, backend = machine
    switcher.on_pre_run(None)
    for p in (0.0, 0.2, 0.2, 0.7, 1.0):
        switcher.on_prepare_state(None, torch.tensor([sigma_at(p)]))
    forward = [key for side, key in backend.log if side == "style"]
    assert forward == [KEYS[m] for m in ("b", "d", "c", "a", "e")]  # each once, by switch point
    backend.log.clear()
    switcher.on_cleanup(None)
    assert [side for side, _ in backend.log] == ["content"] * 5


def test_a_second_sampler_on_the_same_model_starts_from_content(machine):
    """Two KSamplers in a row (or a refiner pass at denoise < 1) reuse the model."""
    switcher, backend = machine
    for start in (0.0, 0.5):
        switcher.on_pre_run(None)
        assert set(backend.side.values()) == {"content"}
        for p in (start, 0.8):
            switcher.on_prepare_state(None, sigma_at(p))
            assert backend.side == expected_sides(p)
        switcher.on_cleanup(None)
    assert backend.begun == backend.ended == 2


def test_an_interrupted_run_is_put_back_by_the_next_pre_run(machine):
    """An interrupt can skip the cleanup callback: the next run must not start switched."""
    switcher, backend = machine
    switcher.on_pre_run(None)
    switcher.on_prepare_state(None, sigma_at(0.7))
    assert "style" in backend.side.values()
    switcher.on_pre_run(None)  # no cleanup in between; begin() asserts everything is content
    assert set(backend.side.values()) == {"content"}


def test_noise_levels_come_from_the_model_schedule_at_every_run(machine):
    switcher, backend = machine
    switcher.on_pre_run(None)
    switcher.on_prepare_state(None, sigma_at(0.4))
    assert backend.side == expected_sides(0.4)
    switcher.on_cleanup(None)
    backend.percent_to_sigma = lambda patcher: (lambda p: 100.0 * (1.0 - p))  # another model sampling
    switcher.on_pre_run(None)
    switcher.on_prepare_state(None, 100.0 * (1 - 0.4))
    assert backend.side == expected_sides(0.4)


def test_sigma_of_reads_tensors_and_numbers():
    assert sigma_of(torch.tensor([[3.5], [3.5]])) == 3.5 and sigma_of(2) == 2.0
