"""K-LoRA during sampling, as a state machine that knows nothing of ComfyUI.

A K-LoRA merge switches some attention projections from the content LoRA to the style LoRA at
their own point of sampling progress (`MergedLora.switch_points`). `SwitchTimeline` orders them
and tells, for a noise level, how many have switched; `KLoraSwitcher` follows sampling through
three callbacks — pre-run (noise levels of the switch points; everything back to content),
prepare-state before every model call (switch the layers whose point has passed) and cleanup
(back to content, also after an error or an interrupt) — and asks a *backend* to move one weight
to its style or its content side. The backends (`nodes/k_lora_patching.py`) are the only code that
touches ComfyUI; this module is tested with a stand-in patcher in the default tier.

Invariants: layers switch in timeline order, so the switched layers are always a prefix of it;
a layer is moved only when its side changes; and after cleanup (or before a run) every layer is
on its content side — what the MODEL looks like outside sampling.

The callbacks accept the call forms of every ComfyUI this pack supports: ComfyUI calls
ON_PREPARE_STATE as `callback(patcher, timestep)` until May 2026 and as
`callback(patcher, timestep, model_options)` after its multi-GPU work; extra arguments are ignored.
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

log = logging.getLogger(__name__)


class SwitchTimeline:
    """The layers that switch during sampling, in the order they switch, and how many of them
    have switched at a noise level. Progress p is ComfyUI's sampling percent (its
    `percent_to_sigma`, as used by ControlNet start/end and hook keyframes): p = 0 at the model's
    highest noise, 1 at none — so any sampler, step count, scheduler or denoise < 1 places every
    step at the p of its noise level. A layer uses the style side iff sigma ≤ sigma(p_l)."""

    def __init__(self, points: Mapping[str, float]):
        self.order = sorted(points, key=lambda k: (points[k], k))
        self.points = [points[k] for k in self.order]
        self._negative_sigmas: list[float] = []

    def set_noise_levels(self, percent_to_sigma: Callable[[float], float]) -> None:
        """sigma(p_l) of every layer (descending), from the model's sampling schedule."""
        self._negative_sigmas = [-float(percent_to_sigma(p)) for p in self.points]

    def switched(self, sigma: float) -> int:
        """How many layers (a prefix of `order`) use their style side at noise level `sigma`."""
        return bisect.bisect_right(self._negative_sigmas, -float(sigma))


class SwitchBackend(Protocol):
    """Moves weights between their two sides; one per scheduled MODEL."""

    def percent_to_sigma(self, patcher: Any) -> Callable[[float], float]: ...

    def begin(self, patcher: Any, keys: Sequence[str]) -> None:
        """Before sampling, with every layer on its content side."""

    def to_style(self, patcher: Any, key: str) -> None: ...

    def to_content(self, patcher: Any, key: str) -> None:
        """Must be harmless for a layer already on its content side (a run interrupted before its
        cleanup leaves some layers switched, and the next pre-run puts all of them back)."""

    def end(self, patcher: Any) -> None:
        """After sampling, with every layer back on its content side."""


def sigma_of(timestep: Any) -> float:
    """The noise level of a model call (ComfyUI passes a tensor of sigmas, one per batch item,
    all equal)."""
    if hasattr(timestep, "reshape"):
        return float(timestep.reshape(-1)[0])
    return float(timestep)


class KLoraSwitcher:
    """Follows sampling and keeps the switched layers a prefix of the timeline (see the module
    docstring). `keys[module]`: the model's weight key of each switching module."""

    def __init__(self, timeline: SwitchTimeline, keys: Mapping[str, str], backend: SwitchBackend):
        self.timeline = timeline
        self.weight_keys = [keys[module] for module in timeline.order]
        self.backend = backend
        self.applied = 0   # layers (a prefix of the timeline) now on their style side

    def on_pre_run(self, patcher: Any, *_: Any) -> None:
        self.timeline.set_noise_levels(self.backend.percent_to_sigma(patcher))
        # Whatever an interrupted run left: every layer back to content.
        self.applied = len(self.weight_keys)
        self._move(patcher, 0)
        self.backend.begin(patcher, self.weight_keys)

    def on_prepare_state(self, patcher: Any, timestep: Any, *_: Any, **__: Any) -> None:
        self._move(patcher, self.timeline.switched(sigma_of(timestep)))

    def on_cleanup(self, patcher: Any, *_: Any) -> None:
        self._move(patcher, 0)
        self.backend.end(patcher)

    def _move(self, patcher: Any, target: int) -> None:
        if target > self.applied:
            for key in self.weight_keys[self.applied:target]:
                self.backend.to_style(patcher, key)
        elif target < self.applied:
            for key in reversed(self.weight_keys[target:self.applied]):
                self.backend.to_content(patcher, key)
        self.applied = target
