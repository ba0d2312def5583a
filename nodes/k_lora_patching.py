"""K-LoRA in ComfyUI: the two ways a scheduled MODEL moves its switching weights.

The schedule itself (which layers are on their style side at a noise level) is
`hypernet.nodelogic.switching.KLoraSwitcher`, driven by ModelPatcher callbacks that every clone of
the model keeps (ON_PRE_RUN, ON_PREPARE_STATE before every model call, ON_CLEANUP). It asks one of
two backends to move a weight:

- **Exchange** (ComfyUI's classic ModelPatcher, which patches weights at load): every switching
  layer is patched with its content side like any LoRA; at its switch point its patch is exchanged
  for the style side and that one weight is patched again — as ComfyUI patches at load
  (`patch_weight_to_device`, from the original) where the original sits on the weight's device
  (CPU runs), or on a GPU, whose originals ComfyUI keeps in CPU memory, from the weight in place:
  minus the content patch plus the style patch (ComfyUI's own `comfy.lora.calculate_weight`; equal
  to the load-time result up to one rounding of the weight's dtype). The content-state tensor is
  kept aside, so switching back is putting it back — exact. That costs one extra copy of the
  switched layers while sampling runs; where the device lacks the room (or the model is patched in
  place), both directions re-patch from ComfyUI's original. Per image: about one LoRA patch of the
  switching layers. Modules loaded in low-VRAM mode read the exchanged patch list by themselves.

- **Per-cast** (ComfyUI ≥ 0.15's dynamic VRAM, `ModelPatcherDynamic`): there, patches are no
  longer merged into the weights at load; a weight kept in VRAM is patched at its first use and the
  patched copy is reused until the model's patches change (`patches_uuid`), so an exchanged patch
  list would go unseen — stale weights, no error. Weight *functions* (`add_weight_wrapper`) are
  applied at every cast, after that reused copy, so each switching weight gets one: it adds the
  side in use (content or style) to the base weight, in float32, at every model call. This is the
  mechanism ComfyUI's own training node uses for weights that change every step. The other way
  core offers, a non-dynamic delegate (what its hook keyframes do), reloads the whole checkpoint
  from disk into a second copy and fails for models without a loader to repeat; the per-cast way
  needs neither, at the cost of one rank-r product per switching layer per model call.

`LORARAR_K_LORA_SWITCH=exchange|per-cast` overrides the choice (troubleshooting and tests); the
default is per-cast exactly where the MODEL is dynamic.
"""

from __future__ import annotations

import logging
import os

import torch

from ..hypernet.errors import LoraMismatchError, LoraRarError
from ..hypernet.merged import PreparedSides
from ..hypernet.nodelogic.switching import KLoraSwitcher, SwitchTimeline

log = logging.getLogger(__name__)

SWITCH_CALLBACK_KEY = "lorarar_k_lora"
SWITCH_MODE_ENV = "LORARAR_K_LORA_SWITCH"
EXCHANGE, PER_CAST = "exchange", "per-cast"


def _percent_to_sigma(patcher):
    return patcher.get_model_object("model_sampling").percent_to_sigma


class ExchangeBackend:
    """Exchanges a layer's content patch for its style patch in the patcher's lists and patches
    that weight again (see the module docstring)."""

    def __init__(self, content_patches: dict, style_patches: dict):
        self.content_patches, self.style_patches = content_patches, style_patches
        self.fast = True   # keep content-state tensors aside
        # True: compute style weights from the weight in place wherever the original is (the GPU
        # path; lets a CPU-only test run it)
        self.update_in_place = False
        self._kept: dict[str, tuple] = {}   # key → (content-state tensor, the style tensor put in its place)

    percent_to_sigma = staticmethod(_percent_to_sigma)

    def begin(self, patcher, keys) -> None:
        import comfy.model_management
        import comfy.utils

        self._kept.clear()
        weights = [comfy.utils.get_attr(patcher.model, key) for key in keys if key in patcher.backup]
        if weights:
            needed = sum(w.numel() * w.element_size() for w in weights)
            free = comfy.model_management.get_free_memory(weights[0].device)
            self.fast = free > needed + comfy.model_management.minimum_inference_memory()

    def end(self, patcher) -> None:
        self._kept.clear()

    def to_style(self, patcher, key: str) -> None:
        self._exchange(patcher, key, self.content_patches[key], self.style_patches[key], to_style=True)

    def to_content(self, patcher, key: str) -> None:
        self._exchange(patcher, key, self.style_patches[key], self.content_patches[key], to_style=False)

    def _exchange(self, patcher, key: str, old, new, to_style: bool) -> None:
        import comfy.float
        import comfy.lora
        import comfy.utils

        patches = patcher.patches.get(key, [])
        index = next((i for i, patch in enumerate(patches) if patch is old), None)
        if index is None:
            return  # already exchanged (or the patch list was rebuilt by a node downstream)
        patches[index] = new
        backup = patcher.backup.get(key)
        if backup is None:
            return  # not patched at load (low-VRAM module): it reads the exchanged list itself
        current = comfy.utils.get_attr(patcher.model, key)
        kept = self._kept.pop(key, None)
        if not to_style and kept is not None and kept[1] is current:
            comfy.utils.set_attr(patcher.model, key, kept[0])  # the content-state tensor, as it was
            return
        keep = to_style and self.fast and not backup.inplace_update
        if keep and (backup.weight.device != current.device or self.update_in_place):
            # The original is on another device (a GPU run): update the weight where it is, from
            # the weight in place — the same patch at minus its strength, then the new one.
            removed = (-old[0], *old[1:])
            weight = comfy.lora.calculate_weight([removed, new], current.to(torch.float32, copy=True), key)
            weight = comfy.float.stochastic_rounding(weight, current.dtype, seed=_seed(key))
            comfy.utils.set_attr(patcher.model, key, torch.nn.Parameter(weight, requires_grad=False))
        else:
            # Exactly as ComfyUI patches at load: from the original weight, with the current list
            # (no copy across devices where the original sits beside the weight, e.g. on the CPU).
            if backup.inplace_update:
                comfy.utils.copy_to_param(patcher.model, key, backup.weight)
            else:
                comfy.utils.set_attr_param(patcher.model, key, backup.weight)
            patcher.patch_weight_to_device(key, device_to=current.device)
        if keep:
            self._kept[key] = (current, comfy.utils.get_attr(patcher.model, key))


def _seed(key: str) -> int:
    import comfy.utils

    if hasattr(comfy.utils, "string_to_seed"):  # its home since 2026
        return comfy.utils.string_to_seed(key)
    import comfy.model_patcher

    return comfy.model_patcher.string_to_seed(key)


class PerCastBackend:
    """Keeps which layers are on their style side; the weight functions read it."""

    def __init__(self):
        self.on_style: set[str] = set()

    percent_to_sigma = staticmethod(_percent_to_sigma)

    def begin(self, patcher, keys) -> None:
        self.on_style.clear()

    def end(self, patcher) -> None:
        self.on_style.clear()

    def to_style(self, patcher, key: str) -> None:
        self.on_style.add(key)

    def to_content(self, patcher, key: str) -> None:
        self.on_style.discard(key)


class SwitchedWeight:
    """A weight function (`ModelPatcher.add_weight_wrapper`) for one switching layer: the cast
    weight plus the side in use, added in float32 and rounded to the cast dtype once. The small
    factors are copied to the weight's device once and kept there; ΔW itself is formed per call
    and never kept (all switching layers' ΔW would be several GB for SDXL)."""

    def __init__(self, backend: PerCastBackend, key: str, content_sides, style_sides):
        self.backend, self.key = backend, key
        self.sides = {False: content_sides, True: style_sides}
        self._on_device: dict[tuple[bool, str], PreparedSides] = {}

    def __call__(self, weight: torch.Tensor) -> torch.Tensor:
        style = self.key in self.backend.on_style
        delta = self._prepared(style, weight.device).delta()
        if delta is None:
            return weight
        return (weight.float() + delta.reshape(weight.shape)).to(weight.dtype)

    def _prepared(self, style: bool, device) -> PreparedSides:
        cache_key = (style, str(device))
        if cache_key not in self._on_device:
            self._on_device[cache_key] = PreparedSides.of(self.sides[style], device)
        return self._on_device[cache_key]

    def move_to(self, device=None) -> int:
        """Called by ComfyUI when the model moves; the factors follow on first use instead."""
        return 0


def switch_mode(patcher) -> str:
    chosen = os.environ.get(SWITCH_MODE_ENV, "").strip().lower()
    if chosen in (EXCHANGE, PER_CAST):
        return chosen
    if chosen:
        log.warning("%s=%s is not one of %s, %s; choosing by the model", SWITCH_MODE_ENV, chosen, EXCHANGE, PER_CAST)
    is_dynamic = getattr(patcher, "is_dynamic", None)
    return PER_CAST if callable(is_dynamic) and is_dynamic() else EXCHANGE


def _callbacks(patcher):
    """ComfyUI's sampling-callback names — or, on a ComfyUI without them (2024), one clear error at
    node time rather than a model that silently never switches."""
    try:
        from comfy.patcher_extension import CallbacksMP
    except ImportError:
        CallbacksMP = None  # noqa: N806
    names = ("ON_PRE_RUN", "ON_PREPARE_STATE", "ON_CLEANUP")
    if CallbacksMP is None or not all(hasattr(CallbacksMP, n) for n in names) \
            or not hasattr(patcher, "add_callback_with_key"):
        raise LoraRarError("model: this ComfyUI has no sampling callbacks (ON_PREPARE_STATE), which the k-lora "
                           "method needs to switch LoRAs while sampling; update ComfyUI (0.3.10 or newer) or "
                           "choose another method")
    return CallbacksMP


def register(patcher, switcher: KLoraSwitcher) -> None:
    """The switcher's callbacks on the patcher."""
    callbacks = _callbacks(patcher)
    patcher.add_callback_with_key(callbacks.ON_PRE_RUN, SWITCH_CALLBACK_KEY, switcher.on_pre_run)
    patcher.add_callback_with_key(callbacks.ON_PREPARE_STATE, SWITCH_CALLBACK_KEY, switcher.on_prepare_state)
    patcher.add_callback_with_key(callbacks.ON_CLEANUP, SWITCH_CALLBACK_KEY, switcher.on_cleanup)


def scheduled_model(model, plan):
    """A clone of `model` whose switching layers follow `plan` during sampling."""
    import comfy.lora

    _callbacks(model)  # before any work: refuse a ComfyUI that cannot switch
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    keys = {module: key_map[module] for module in plan.points if module in key_map}
    missing = sorted(set(plan.points) - set(keys))
    if missing:
        raise LoraMismatchError(f"model: the k-lora merge switches layers this model does not have, "
                                f"e.g. {missing[0]}; are the LoRAs for this model's family?")
    patched = model.clone()
    mode = switch_mode(patched)
    if mode == PER_CAST and not hasattr(patched, "add_weight_wrapper"):
        log.warning("k-lora: this ComfyUI has no weight functions; switching by exchanging patches instead")
        mode = EXCHANGE
    if mode == PER_CAST:
        backend = PerCastBackend()
        for module, key in keys.items():
            content_sides, style_sides = plan.sides[module]
            patched.add_weight_wrapper(key, SwitchedWeight(backend, key, content_sides, style_sides))
    else:
        to_load = {module: keys[module] for module in keys}
        content = comfy.lora.load_lora(plan.content, to_load, log_missing=False)
        style = comfy.lora.load_lora(plan.style, to_load, log_missing=False)
        patched.add_patches({key: content[key] for key in keys.values()}, plan.content_strength)  # one call
        content_patches = {key: patched.patches[key][-1] for key in keys.values()}
        # the tuple add_patches builds: (strength_patch, patch, strength_model, offset, function)
        style_patches = {key: (plan.style_strength, style[key], 1.0, None, None) for key in keys.values()}
        backend = ExchangeBackend(content_patches, style_patches)
    log.info("k-lora: %d layer(s) switch during sampling (%s)", len(keys), mode)
    register(patched, KLoraSwitcher(SwitchTimeline(plan.points), keys, backend))
    return patched
