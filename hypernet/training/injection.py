"""Differentiable LoRA injection into a live UNet, for the ZipLoRA objective and training.

`LoraInjection(unet, content, style)` attaches a content and a style LoRA (canonical
`LoraFile`s) to the UNet's Linear (and conv) modules with forward hooks, matched by canonical
layer name in either LDM naming (ComfyUI's `UNetModel`, `model.model.diffusion_model`) or
diffusers naming (`down_blocks.1.attentions.0…`). Its `mode` selects what the UNet computes:

- "content" / "style": the base model plus that one LoRA (times its strength);
- "merged": both, with hypernetwork-target layers (`to_q`, `to_out.0` of attn1/attn2 by
  default) scaled per input column by the coefficients in `.coefficients` — from free
  ZipLoRA vectors or from a hypernetwork — and every other shared layer summed (strengths after the method, docs/methods.md);
- "off": the base model.

The LoRA path is x·diag(m)·Aᵀ·Bᵀ·scale: m is folded into the small (r × in) down matrix, so
ΔW (out × in) is never formed and gradients reach m (or H) cheaply. Hooks add to the module's
output and never touch its parameters; leaving the context removes them and restores every
parameter's `requires_grad`, so the base model is bit-identical afterwards.
"""

from __future__ import annotations

import contextlib
import logging
import re
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .. import naming
from ..errors import LoraMismatchError
from ..lora import LoraFile, LoraLayer
from ..methods.lorarar import is_hypernet_target
from ..model import DEFAULT_TARGETS

log = logging.getLogger(__name__)

MODES = ("off", "content", "style", "merged")
Coefficients = dict[str, tuple[torch.Tensor, torch.Tensor]]


def find_module(root: nn.Module, name: str) -> nn.Module | None:
    """The module for a canonical (LDM) layer name in an LDM- or diffusers-named UNet."""
    candidates = [name]
    try:
        candidates.append(naming.ldm_to_diffusers(name))
    except ValueError:
        pass  # not a transformer-block layer: only the LDM name can match
    for prefix in ("", "diffusion_model."):
        for candidate in candidates:
            try:
                return root.get_submodule(prefix + candidate)
            except AttributeError:
                continue
    return None


_TRANSFORMER_LAYER = re.compile(r"(^|\.)(transformer_blocks\.\d+\.|proj_in$|proj_out$)")


def linear_layer_shapes(unet: nn.Module) -> dict[str, tuple[int, int]]:
    """Canonical name → (out, in) of every Linear inside the UNet's transformer blocks."""
    shapes = {}
    for path, module in unet.named_modules():
        if isinstance(module, nn.Linear) and _TRANSFORMER_LAYER.search(path):
            path = path.removeprefix("diffusion_model.")
            name = path if path.startswith(("input_blocks", "middle_block", "output_blocks")) \
                else naming.diffusers_to_ldm(path)
            shapes[name] = (module.out_features, module.in_features)
    return shapes


def attention_widths(shapes: dict[str, tuple[int, int]], targets: tuple[str, ...] = DEFAULT_TARGETS) -> tuple[int, ...]:
    """The widths (out features) of the hypernetwork-target layers of a base model."""
    return tuple(sorted({out for name, (out, _) in shapes.items() if is_hypernet_target(name, targets)}))


@dataclass
class _Side:
    """One LoRA's factors for one module, on the compute device, in float32."""

    up: torch.Tensor | None      # (out, r) incl. alpha/rank × strength; None for dense
    down: torch.Tensor | None    # (r, in) or (r, in, k, k)
    dense: torch.Tensor | None   # ΔW (× strength) for adapters without a low-rank form
    _cast: dict = field(default_factory=dict)

    def cast(self, dtype: torch.dtype) -> tuple:
        if dtype not in self._cast:
            self._cast[dtype] = tuple(None if t is None else t.to(dtype) for t in (self.up, self.down, self.dense))
        return self._cast[dtype]


def _make_side(layer: LoraLayer, strength: float, module: nn.Module, device, name: str, role: str) -> _Side:
    weight_shape = tuple(module.weight.shape)
    if tuple(layer.shape) != weight_shape and tuple(layer.shape) != weight_shape[:2]:
        raise LoraMismatchError(
            f"{role} LoRA layer {name} has shape {tuple(layer.shape)} but the model's module has "
            f"weight shape {weight_shape}; the LoRA was trained for a different base model")
    if layer.is_low_rank and layer.mid is None:
        up = (layer.up.float().reshape(layer.up.shape[0], -1) * (layer.scale * strength)).to(device)
        down = layer.down.float().to(device)
        if isinstance(module, nn.Linear):
            down = down.reshape(down.shape[0], -1)
        return _Side(up, down, None)
    return _Side(None, None, (layer.delta() * strength).reshape(weight_shape).to(device))


@dataclass
class _Adapter:
    name: str
    module: nn.Module
    content: _Side | None
    style: _Side | None
    target: bool  # merged by coefficients in "merged" mode


class LoraInjection:
    """Context manager; see the module docstring. Use `.mode` and `.coefficients` between passes."""

    def __init__(self, unet: nn.Module, content: LoraFile | None, style: LoraFile | None,
                 targets: tuple[str, ...] = DEFAULT_TARGETS, content_strength: float = 1.0,
                 style_strength: float = 1.0, device: torch.device | str | None = None):
        self.unet = unet
        self.targets = tuple(targets)
        self.mode = "off"
        self.coefficients: Coefficients | None = None
        device = device or next(unet.parameters()).device
        names = list(content.unet_layers if content else [])
        names += [n for n in (style.unet_layers if style else []) if n not in names]
        missing = [n for n in names if find_module(unet, n) is None]
        if missing:
            owner = "content" if content and missing[0] in content.layers else "style"
            raise LoraMismatchError(
                f"{len(missing)} LoRA layer(s) have no module in this model (first: {missing[0]}, from the "
                f"{owner} LoRA {(content if owner == 'content' else style).source}); the LoRA was trained "
                "for a different base model")
        self.adapters: dict[str, _Adapter] = {}
        for name in names:
            module = find_module(unet, name)
            sides = []
            for lora, strength, role in ((content, content_strength, "content"), (style, style_strength, "style")):
                layer = lora.layers.get(name) if lora else None
                sides.append(_make_side(layer, strength, module, device, name, role) if layer else None)
            target = all(sides) and is_hypernet_target(name, self.targets) and isinstance(module, nn.Linear)
            self.adapters[name] = _Adapter(name, module, sides[0], sides[1], target)
        self._handles: list = []
        self._grad_flags: list[tuple[nn.Parameter, bool]] = []

    @property
    def target_layers(self) -> list[str]:
        """Layers whose merge uses coefficients, in UNet order (both LoRAs have them)."""
        return [a.name for a in self.adapters.values() if a.target]

    def target_widths(self) -> dict[str, int]:
        return {a.name: a.module.in_features for a in self.adapters.values() if a.target}

    # -- attach / detach -------------------------------------------------------------------------

    def __enter__(self) -> "LoraInjection":
        self.attach()
        return self

    def __exit__(self, *exc) -> None:
        self.detach()

    def attach(self) -> None:
        if self._handles:
            return
        # The base is frozen while attached: gradients are wanted for m / H only, and leaving
        # requires_grad on would fill the UNet's .grad (and cost a weight-gradient per layer).
        self._grad_flags = [(p, p.requires_grad) for p in self.unet.parameters()]
        for p, _ in self._grad_flags:
            p.requires_grad_(False)
        for adapter in self.adapters.values():
            self._handles.append(adapter.module.register_forward_hook(self._hook(adapter)))

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        for p, flag in self._grad_flags:
            p.requires_grad_(flag)
        self._grad_flags = []

    # -- the LoRA path -----------------------------------------------------------------------------

    def _hook(self, adapter: _Adapter):
        def hook(module, args, output):
            extra = self._lora_output(adapter, args[0] if args else None)
            return output if extra is None else output + extra.to(output.dtype)
        return hook

    def _lora_output(self, adapter: _Adapter, x: torch.Tensor | None) -> torch.Tensor | None:
        mode = self.mode
        if mode == "off" or x is None:
            return None
        m_c = m_s = None
        if mode == "merged" and adapter.target:
            if self.coefficients is None or adapter.name not in self.coefficients:
                raise RuntimeError(f"merged mode needs coefficients for {adapter.name}")
            m_c, m_s = self.coefficients[adapter.name]
        out = None
        for side, m, wanted in ((adapter.content, m_c, mode in ("content", "merged")),
                                (adapter.style, m_s, mode in ("style", "merged"))):
            if side is None or not wanted:
                continue
            y = _side_output(adapter.module, side, x, m)
            out = y if out is None else out + y
        return out


def _side_output(module: nn.Module, side: _Side, x: torch.Tensor, m: torch.Tensor | None) -> torch.Tensor:
    dtype = x.dtype if not torch.is_autocast_enabled(x.device.type) else torch.float32
    up, down, dense = side.cast(dtype) if m is None else (side.up, side.down, side.dense)
    if isinstance(module, nn.Linear):
        if dense is not None:
            return F.linear(x if m is None else x * m.to(x.dtype), dense.to(x.dtype))
        if m is not None:
            # diag(m) folded into the (r × in) down matrix: cheap, and differentiable in m.
            down = (down * m[None, :]).to(dtype)
            up = up.to(dtype)
        return F.linear(F.linear(x, down), up)
    if isinstance(module, nn.Conv2d):
        kwargs = dict(stride=module.stride, padding=module.padding, dilation=module.dilation)
        if dense is not None:
            return F.conv2d(x, dense.to(x.dtype), groups=module.groups, **kwargs)
        if down.dim() == 2:
            down = down[:, :, None, None]
        h = F.conv2d(x, down.to(x.dtype), **kwargs)
        return F.conv2d(h, up.to(x.dtype)[:, :, None, None])
    raise LoraMismatchError(f"cannot attach a LoRA to a {type(module).__name__} module")


@contextlib.contextmanager
def checkpointed_blocks(unet: nn.Module, enabled: bool = True):
    """Gradient checkpointing for every transformer block while the context is open.

    Only activations are traded for recomputation; the forward hooks run again on recompute and
    give identical results. The original `forward` is restored on exit (the instance attribute
    is deleted), so the model is unchanged afterwards.
    """
    if not enabled:
        yield
        return
    from torch.utils.checkpoint import checkpoint

    patched = []
    for path, module in unet.named_modules():
        if re.search(r"transformer_blocks\.\d+$", path):
            original = module.forward

            def forward(*args, _original=original, **kwargs):
                if torch.is_grad_enabled():
                    return checkpoint(_original, *args, use_reentrant=False, **kwargs)
                return _original(*args, **kwargs)

            module.forward = forward
            patched.append(module)
    try:
        yield
    finally:
        for module in patched:
            del module.forward
