"""Read any LoRA, of any family this pack knows, into one canonical form.

`read_lora(path)` / `lora_from_state_dict(sd)` return a `LoraFile`: per layer (canonical name: the
model's own weight name, see hypernet/families/spec.py) a `LoraLayer` with the factors up/down
(+ mid for Tucker conv), alpha and the adapter kind, and the base-model family the file is for.

How a file is read:
1. each key is split into its module and its tensor's role (families/keys.py: `.lora_down.weight`,
   `.lora_A.weight`, `_lora.up.weight`, `.hada_w1_a`, `.alpha`, …) and the module's prefix tells
   which trainer wrote it (kohya `lora_unet_`, diffusers `transformer.`/`unet.`, ComfyUI
   `diffusion_model.`, OneTrainer, LyCORIS, XLabs, no prefix, …) — the *key layout*;
2. the family is detected from the module paths and the factors' shapes (families/detect.py), or
   given by the caller; never from the file name;
3. the family's vocabularies turn each module into a canonical weight — a slice of a fused weight
   where the trainer named one projection of it (diffusers' `to_q` of Flux's `img_attn.qkv`);
4. the tensors of one weight become one layer: a slice is placed into its rows of the fused weight,
   a block-sparse LoRA of it (up has zeros outside those rows; several slices side by side), so
   one name is always one whole weight and a kohya LoRA on `qkv` and a diffusers LoRA on `to_q`
   merge in the same space. Neither the zeros nor a stacked copy are held: such a layer's up is
   a `RowBlocks` and its down a `Stacked` (hypernet/row_blocks.py: the pieces' own tensors with
   their rows and ranks), and the merges work on the pieces.
Tensors keep the file's dtype; maths happens in float32 on demand.

Where alpha comes from, first found wins (per layer):
1. an `.alpha` tensor beside the factors (kohya, LyCORIS, ComfyUI, diffusers' kohya exporter);
2. the safetensors header entry `lora_adapter_metadata` (diffusers' `save_lora_weights`: a JSON
   object with per-component peft settings `unet.r`, `unet.lora_alpha`, `unet.rank_pattern`,
   `unet.alpha_pattern`, `unet.use_rslora`, `transformer.…`, `text_encoder.…`);
3. `adapter_config.json` beside an `adapter_model.safetensors` (peft's `save_pretrained`);
4. nowhere: scale 1 (alpha = rank) is assumed, and the LoraFile says so (`scale_assumed_layers`,
   `notes`) so that inspect and merge reports can.
`rank_pattern`/`alpha_pattern` keys are matched against module names with peft's own rule: the
first key (in the file's order) for which `re.match(rf"(.*\\.)?({key})$", module)` succeeds.
With `use_rslora` the scale is alpha/√r instead of alpha/r. `LoraLayer.alpha` always holds the
kohya-equivalent alpha (scale = alpha / rank), so everything downstream reads one convention.

What a file may ask for (a hostile file must fail fast and small, never by exhausting memory):
every factor is checked against the others *before* anything is expanded, no layer may adapt a
weight larger than its family allows (`max_layer_elements` in the family's data: 2^26 = 67,108,864
elements for the UNets, whose largest weight, an SDXL output-block conv, has 29.5 M; more for the
large DiTs — Wan 14B's feed-forward has 70.8 M, Flux.2's linear1 340 M), and the layers that a merge
must expand (no low-rank form) may not add up to more than the family's `max_dense_elements`
(about the whole model). Reading itself never expands anything, except slices of a fused weight
that have no low-rank form (LoHa, LoKr, full differences on one projection), which are placed as a
dense difference of the fused weight.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import families, naming, row_blocks
from .errors import LoraFormatError
from .families import cloneofsimo
from .families.detect import Module, detect, read_module
from .families.keys import (  # noqa: F401 - re-exported: the layouts' names are part of the reader's API
    LAYOUT_BARE,
    LAYOUT_CLONEOFSIMO,
    LAYOUT_COMFYUI,
    LAYOUT_DIFFUSERS,
    LAYOUT_DIFFUSERS_PROCESSOR,
    LAYOUT_KOHYA,
    LAYOUT_KOHYA_DIFFUSERS,
    LAYOUT_LYCORIS,
    LAYOUT_ONETRAINER,
    LAYOUT_PEFT,
    LAYOUT_PEFT_STATE_DICT,
    LAYOUT_XLABS,
    MAX_KEY_LENGTH,
    ParsedModule,
    layout_of,
    parse_module,
    split_key,
)
from .peft_settings import (
    ALPHA_FROM_ADAPTER_CONFIG,
    ALPHA_FROM_HEADER,
    ALPHA_FROM_TENSOR,
    ALPHA_NONE,
    PatternMatcher,
    PeftSettings,
    adapter_config_for,
    header_settings,
    peft_settings_of,
)
from .row_blocks import RowBlocks, Stacked
from .safetensors_io import load_safetensors

log = logging.getLogger(__name__)

LOW_RANK = "lora"          # up @ down (+ Tucker mid), possibly with a DoRA magnitude
LOHA = "loha"
LOKR = "lokr"
FULL = "full"              # a stored weight difference (`.diff`)

# The caps of a file whose family is not known yet (the UNets'; each family has its own).
MAX_LAYER_ELEMENTS = 1 << 26
MAX_FILE_DENSE_ELEMENTS = 1 << 32

FACTOR_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _adapted_shape(kind: str, t: dict[str, torch.Tensor]) -> tuple[int, ...]:
    """Shape of the ΔW that `delta()` forms, from the factors' shapes alone (never expands).
    Assumes the factors were validated (`_validate_layer`)."""
    if kind == LOW_RANK:
        up, down, mid = t["up"], t["down"], t.get("mid")
        if mid is not None:
            return (up.shape[0], down.shape[1], *mid.shape[2:])
        return (up.shape[0], *down.shape[1:])
    if kind == LOHA:
        if "hada_t1" in t:
            return (t["hada_w1_a"].shape[1], t["hada_w1_b"].shape[1], *t["hada_t1"].shape[2:])
        return (t["hada_w1_a"].shape[0], t["hada_w1_b"].shape[1])
    if kind == LOKR:
        a, b = _lokr_w1_shape(t)
        c, d, *kernel = _lokr_w2_shape(t)
        return (a * c, b * d, *kernel)
    return tuple(t["diff"].shape)


def _lokr_w1_shape(t: dict[str, torch.Tensor]) -> tuple[int, int]:
    if "lokr_w1" in t:
        return tuple(t["lokr_w1"].shape)
    return (t["lokr_w1_a"].shape[0], t["lokr_w1_b"].shape[1])


def _lokr_w2_shape(t: dict[str, torch.Tensor]) -> tuple[int, ...]:
    if "lokr_w2" in t:
        return tuple(t["lokr_w2"].shape)
    if "lokr_t2" in t:
        return (t["lokr_w2_a"].shape[1], t["lokr_w2_b"].shape[1], *t["lokr_t2"].shape[2:])
    return (t["lokr_w2_a"].shape[0], t["lokr_w2_b"].shape[1])


@dataclass
class LoraLayer:
    """One adapted layer. `tensors` holds the raw factors by role (up, down, mid, hada_w1_a, …);
    for a LoRA made of pieces of a fused weight, "up" is a `RowBlocks` (the pieces' ups without
    the zeros between them) and "down" a `Stacked` (the pieces' downs): `up_factor` and
    `down_factor` give the factors as held, `up` and `down` dense tensors (formed at each call
    for such a layer — for consumers that need one, a layer at a time).

    `alpha` is the kohya-equivalent alpha (scale = alpha / rank) wherever it was found;
    `alpha_source` says where (ALPHA_FROM_TENSOR, ALPHA_FROM_HEADER, ALPHA_FROM_ADAPTER_CONFIG,
    or ALPHA_NONE when the file has none for this layer)."""

    kind: str
    tensors: dict[str, torch.Tensor]
    alpha: float | None = None
    alpha_source: str = ALPHA_NONE

    def __post_init__(self) -> None:
        if self.alpha is not None and self.alpha_source == ALPHA_NONE:
            self.alpha_source = ALPHA_FROM_TENSOR

    @property
    def up(self) -> torch.Tensor:
        """up as a dense tensor (out, rank[, 1, 1])."""
        return row_blocks.dense(self.tensors["up"])

    @property
    def up_factor(self) -> torch.Tensor | RowBlocks:
        """up as held: a tensor, or a `RowBlocks` for a layer made of pieces of a fused weight."""
        return self.tensors["up"]

    def held_tensors(self) -> list[torch.Tensor]:
        """Every tensor this layer holds (a `RowBlocks`' pieces, not its dense form)."""
        return [t for v in self.tensors.values() for t in ((v,) if isinstance(v, torch.Tensor) else v.pieces)]

    @property
    def down(self) -> torch.Tensor:
        """down as a dense tensor (rank, in[, k, k])."""
        return row_blocks.dense(self.tensors["down"])

    @property
    def down_factor(self) -> torch.Tensor | Stacked:
        """down as held: a tensor, or a `Stacked` for a layer made of pieces of a fused weight."""
        return self.tensors["down"]

    @property
    def mid(self) -> torch.Tensor | None:
        return self.tensors.get("mid")

    @property
    def is_dora(self) -> bool:
        return "dora_scale" in self.tensors

    @property
    def is_low_rank(self) -> bool:
        """Plain LoRA/LoCon without DoRA: can be merged without forming ΔW."""
        return self.kind == LOW_RANK and not self.is_dora

    @property
    def rank(self) -> int:
        if self.kind == LOW_RANK:
            return self.tensors["down"].shape[0]
        if self.kind == LOHA:
            return self.tensors["hada_w1_b"].shape[0]
        if self.kind == LOKR:
            for role in ("lokr_w2_b", "lokr_w1_b"):
                if role in self.tensors:
                    return self.tensors[role].shape[0]
        return 0

    @property
    def uses_alpha(self) -> bool:
        """Whether alpha changes this layer's ΔW (full LoKr factors and `.diff` ignore it)."""
        if self.kind in (LOW_RANK, LOHA):
            return True
        return self.kind == LOKR and bool({"lokr_w1_b", "lokr_w2_b"} & self.tensors.keys())

    @property
    def scale(self) -> float:
        """alpha / rank; 1 without alpha (and for adapters whose factors are full)."""
        if self.alpha is None or self.rank == 0 or not self.uses_alpha:
            return 1.0
        return self.alpha / self.rank

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of the weight this layer adapts: (out, in) or (out, in, k, k)."""
        return _adapted_shape(self.kind, self.tensors)

    @property
    def dtype(self) -> torch.dtype:
        return next(iter(self.tensors.values())).dtype

    def scaled_up(self) -> torch.Tensor:
        """scale · up in float32, flattened to (out, rank): the left factor of ΔW."""
        return self.up.float().reshape(self.up.shape[0], -1) * self.scale

    def down_matrix(self) -> torch.Tensor:
        """down in float32 as (rank, in·k·k): the right factor of ΔW."""
        return self.down.float().reshape(self.down.shape[0], -1)

    def delta(self) -> torch.Tensor:
        """Dense float32 ΔW including the alpha/rank scale. Only for layers that need it."""
        if row_blocks.is_row_blocks(self.tensors.get("up")):  # the pieces' products, into their rows
            down = self.down.float().flatten(1)
            w = down.new_zeros(self.shape[0], down.shape[1])
            return row_blocks.add_product(w, self.up_factor, down, self.scale).reshape(self.shape)
        t = {k: v.float() for k, v in self.tensors.items()}
        if self.kind == LOW_RANK:
            if self.mid is not None:  # LoCon Tucker: up (o,r,1,1), mid (r,r,k,k), down (r,i,1,1)
                w = torch.einsum("rskl,si->rikl", t["mid"], t["down"].flatten(1))
                w = torch.einsum("or,rikl->oikl", t["up"].flatten(1), w)
            else:
                w = (t["up"].flatten(1) @ t["down"].flatten(1)).reshape(
                    t["up"].shape[0], *t["down"].shape[1:])
            return w * self.scale
        if self.kind == LOHA:
            if "hada_t1" in t:
                w1 = torch.einsum("ijkl,jr,ip->prkl", t["hada_t1"], t["hada_w1_b"], t["hada_w1_a"])
                w2 = torch.einsum("ijkl,jr,ip->prkl", t["hada_t2"], t["hada_w2_b"], t["hada_w2_a"])
            else:
                w1 = t["hada_w1_a"] @ t["hada_w1_b"]
                w2 = t["hada_w2_a"] @ t["hada_w2_b"]
            return w1 * w2 * self.scale
        if self.kind == LOKR:
            w1 = t["lokr_w1"] if "lokr_w1" in t else t["lokr_w1_a"] @ t["lokr_w1_b"]
            if "lokr_w2" in t:
                w2 = t["lokr_w2"]
            elif "lokr_t2" in t:
                w2 = torch.einsum("ijkl,jr,ip->prkl", t["lokr_t2"], t["lokr_w2_b"], t["lokr_w2_a"])
            else:
                w2 = t["lokr_w2_a"] @ t["lokr_w2_b"]
            if w2.dim() == 4:
                w1 = w1[:, :, None, None]
            return torch.kron(w1.contiguous(), w2.contiguous()) * self.scale  # (an einsum result may not be)
        return t["diff"]


@dataclass
class LoraFile:
    """A LoRA in canonical form, for one base-model `family` (hypernet/families).

    Facts for reports (what a merge must say, not only log): `unrecognised_keys` (left out of
    every layer), `scale_assumed_layers` (alpha found nowhere: scale 1 assumed),
    `alpha_sources` (how many layers took alpha from where), `notes` (those facts as sentences),
    `key_layouts` (which trainers' key forms the file uses), `family_candidates` (every family its
    keys and shapes fit equally well; the merge settles an ambiguity with the other inputs).
    """

    layers: dict[str, LoraLayer]
    metadata: dict[str, str] = field(default_factory=dict)
    key_layouts: Counter = field(default_factory=Counter)
    unrecognised_keys: list[str] = field(default_factory=list)
    source: str = ""
    notes: list[str] = field(default_factory=list)
    tensor_dtypes: Counter = field(default_factory=Counter)  # every tensor of the file, alphas too
    family: str | None = None
    family_candidates: tuple[str, ...] = ()
    family_evidence: str = ""
    # what the file was read from, so that it can be read again for another candidate family
    _origin: tuple | None = field(default=None, repr=False, compare=False)
    _as_family: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def unet_layers(self) -> dict[str, LoraLayer]:
        """The diffusion model's layers (the UNet's or the transformer's)."""
        return {k: v for k, v in self.layers.items() if not naming.is_text_encoder(k)}

    @property
    def text_encoder_layers(self) -> dict[str, LoraLayer]:
        return {k: v for k, v in self.layers.items() if naming.is_text_encoder(k)}

    @property
    def family_name(self) -> str:
        return families.name_of(self.family)

    @property
    def alpha_sources(self) -> Counter:
        return Counter(layer.alpha_source for layer in self.layers.values() if layer.uses_alpha)

    @property
    def scale_assumed_layers(self) -> list[str]:
        """Layers whose ΔW depends on alpha but whose file gives none anywhere (scale 1 used)."""
        return [name for name, layer in self.layers.items() if layer.uses_alpha and layer.alpha is None]

    @property
    def unrecognised_modules(self) -> list[str]:
        """The unrecognised keys grouped by module (a layer's up/down/alpha count once)."""
        modules = []
        for key in self.unrecognised_keys:
            split = split_key(key) if isinstance(key, str) else None
            modules.append(split[0] if split else key)
        return sorted(set(modules))

    def kinds(self) -> Counter:
        return Counter("dora" if layer.is_dora else layer.kind for layer in self.layers.values())

    def as_family(self, family: str) -> LoraFile:
        """This file read for another of its candidate families (itself if it already is)."""
        if family == self.family:
            return self
        if self._origin is None:
            raise LoraFormatError(f"{self.source}: read for {self.family_name}; it cannot be read again for "
                                  f"{families.name_of(family)}")
        if family not in self._as_family:  # once: the merge cache knows inputs by identity
            state_dict, metadata, adapter_config, check_values = self._origin
            self._as_family[family] = lora_from_state_dict(state_dict, metadata, self.source, adapter_config,
                                                           check_values, family=family)
        return self._as_family[family]


# ---------------------------------------------------------------------------------------------
# Validation: before anything is expanded, every factor must fit the others.

def _validate_layer(source: str, name: str, kind: str, t: dict[str, torch.Tensor],
                    spec: families.FamilySpec | None = None) -> None:
    where = f"{source}: layer {name}"
    for role, tensor in t.items():
        if tensor.dtype not in FACTOR_DTYPES:
            raise LoraFormatError(f"{where}: {role} has dtype {str(tensor.dtype).replace('torch.', '')}; LoRA "
                                  "factors must be float16, bfloat16, float32 or float64")
        if tensor.dim() == 0 or tensor.numel() == 0:
            raise LoraFormatError(f"{where}: {role} has shape {tuple(tensor.shape)}; a factor needs at least "
                                  "one dimension and a non-zero size (rank 0 adapts nothing)")

    def dims(role: str, *allowed: int) -> tuple[int, ...]:
        shape = tuple(t[role].shape)
        if len(shape) not in allowed:
            raise LoraFormatError(f"{where}: {role} has shape {shape}; expected "
                                  + " or ".join(f"{d}-D" for d in allowed))
        return shape

    def chain(left: str, right: str, a: int, b: int) -> None:
        if a != b:
            raise LoraFormatError(f"{where}: {left} {tuple(t[left].shape)} and {right} {tuple(t[right].shape)} "
                                  "do not chain")

    if kind == LOW_RANK:
        up, down = dims("up", 2, 4), dims("down", 2, 4)
        if "mid" in t:
            mid = dims("mid", 4)
            if (len(up) == 4 and up[2:] != (1, 1)) or (len(down) == 4 and down[2:] != (1, 1)):
                raise LoraFormatError(f"{where}: Tucker up {up} and down {down} must be 1×1 around mid {mid}")
            chain("up", "mid", up[1], mid[0])
            chain("mid", "down", mid[1], down[0])
        else:
            if len(up) == 4 and up[2:] != (1, 1):
                raise LoraFormatError(f"{where}: up {up} must be 1×1 in its kernel dimensions")
            if up[1] != down[0]:
                raise LoraFormatError(
                    f"{where}: up {up} and down {down} do not chain (up's second dimension must equal down's rank)")
        if "dora_scale" in t:
            out, rest = up[0], math.prod(_adapted_shape(kind, t)[1:])
            if t["dora_scale"].numel() not in (out, rest):
                raise LoraFormatError(f"{where}: DoRA magnitude {tuple(t['dora_scale'].shape)} fits neither "
                                      f"the {out} outputs nor the {rest} inputs")
    elif kind == LOHA:
        tucker = {"hada_t1", "hada_t2"} & t.keys()
        if tucker and tucker != {"hada_t1", "hada_t2"}:
            raise LoraFormatError(f"{where}: LoHa has {', '.join(sorted(tucker))} but needs both hada_t1 and hada_t2")
        products = []
        for i in ("1", "2"):
            a, b = dims(f"hada_w{i}_a", 2), dims(f"hada_w{i}_b", 2)
            if tucker:
                core = dims(f"hada_t{i}", 4)
                chain(f"hada_t{i}", f"hada_w{i}_a", core[0], a[0])
                chain(f"hada_t{i}", f"hada_w{i}_b", core[1], b[0])
                products.append((a[1], b[1], *core[2:]))
            else:
                chain(f"hada_w{i}_a", f"hada_w{i}_b", a[1], b[0])
                products.append((a[0], b[1]))
        if products[0] != products[1]:
            raise LoraFormatError(f"{where}: LoHa's two products have different shapes {products[0]} and {products[1]}")
    elif kind == LOKR:
        if "lokr_w1" in t:
            dims("lokr_w1", 2)
        else:
            chain("lokr_w1_a", "lokr_w1_b", dims("lokr_w1_a", 2)[1], dims("lokr_w1_b", 2)[0])
        if "lokr_w2" in t:
            dims("lokr_w2", 2, 4)
        elif "lokr_t2" in t:
            core, a, b = dims("lokr_t2", 4), dims("lokr_w2_a", 2), dims("lokr_w2_b", 2)
            chain("lokr_t2", "lokr_w2_a", core[0], a[0])
            chain("lokr_t2", "lokr_w2_b", core[1], b[0])
        else:
            chain("lokr_w2_a", "lokr_w2_b", dims("lokr_w2_a", 2)[1], dims("lokr_w2_b", 2)[0])
    else:
        dims("diff", 1, 2, 3, 4)
    shape = _adapted_shape(kind, t)
    limit = spec.max_layer_elements if spec is not None else MAX_LAYER_ELEMENTS
    if math.prod(shape) > limit:
        largest = f" ({spec.name}'s largest weight has {spec.largest_weight():,})" if spec is not None else ""
        raise LoraFormatError(
            f"{where}: its factors describe a {'×'.join(map(str, shape))} weight ({math.prod(shape):,} elements); "
            f"at most {limit:,} are accepted{largest}")


def _alpha_value(source: str, name: str, tensor: torch.Tensor) -> float:
    where = f"{source}: layer {name}: alpha"
    if tensor.numel() != 1 or tensor.dtype == torch.bool or tensor.is_complex():
        raise LoraFormatError(f"{where} must be one real number, found a {str(tensor.dtype).replace('torch.', '')} "
                              f"tensor of shape {tuple(tensor.shape)}")
    value = float(tensor.reshape(()).to(torch.float64).item())
    if not math.isfinite(value):
        raise LoraFormatError(f"{where} is {value}; the file is damaged or was saved from a diverged training run")
    return value


def _adapter_kind(tensors: dict[str, torch.Tensor]) -> str | None:
    if "up" in tensors and "down" in tensors:
        return LOW_RANK
    if {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"} <= tensors.keys():
        return LOHA
    if ("lokr_w1" in tensors or {"lokr_w1_a", "lokr_w1_b"} <= tensors.keys()) and (
            "lokr_w2" in tensors or {"lokr_w2_a", "lokr_w2_b"} <= tensors.keys()):
        if "lokr_t2" in tensors and not {"lokr_w2_a", "lokr_w2_b"} <= tensors.keys():
            return None
        return LOKR
    if "diff" in tensors:
        return FULL
    return None


# ---------------------------------------------------------------------------------------------
# Reading

def _dtype_name(tensor: torch.Tensor) -> str:
    return str(tensor.dtype).replace("torch.", "")


@dataclass
class _Module:
    """One module of a file: its tensors by role, the keys they came from, how its key reads."""

    key: str
    tensors: dict[str, torch.Tensor]
    keys: dict[str, str]
    parsed: ParsedModule | None = None
    shape: tuple[int, ...] | None = None
    layout: str = ""


@dataclass
class _Piece:
    """A module read as (part of) a canonical weight, with its layer (alpha resolved)."""

    module: _Module
    parts: tuple[str, ...]
    layer: LoraLayer | None = None


def _apparent_shape(tensors: dict[str, torch.Tensor]) -> tuple[int, ...] | None:
    """The adapted weight's shape as far as the factors tell before they are validated (detection
    only; a malformed layer gets its precise error from `_validate_layer`)."""
    kind = _adapter_kind(tensors)
    if kind is None:
        return None
    try:
        shape = _adapted_shape(kind, tensors)
    except (IndexError, KeyError, TypeError, ValueError):
        return None
    return shape if len(shape) >= 2 and all(isinstance(d, int) and d > 0 for d in shape) else None


def lora_from_state_dict(state_dict: dict[str, torch.Tensor], metadata: dict[str, str] | None = None,
                         source: str = "LoRA", adapter_config: dict | None = None,
                         check_values: bool = True, family: str | None = None) -> LoraFile:
    """Turn a raw LoRA state dict (any family, any key layout) into a LoraFile — the one reader
    behind `read_lora` (CLI, library) and the nodes' LORA_MODEL inputs, so all get the same checks
    and messages.

    `metadata` is the safetensors header metadata (diffusers keeps alpha there, in
    `lora_adapter_metadata`); `adapter_config` is a parsed `adapter_config.json` for peft's
    `base_model.model.…` keys (see `adapter_config_for`). `check_values`: refuse NaN/Inf in any
    factor (`check_finite`); only `inspect`, which reports them instead, turns it off. `family`:
    read the file as that family (an id of hypernet/families) instead of detecting it."""
    metadata = dict(metadata or {})
    origin = (state_dict, metadata, adapter_config, check_values)
    spec = families.get(family) if family is not None else None
    notes: list[str] = []
    converted: set[str] = set()
    if cloneofsimo.is_cloneofsimo(state_dict.keys()):
        original = state_dict
        readable, from_keys, notes = cloneofsimo.convert(state_dict, metadata, source)
        converted = set(readable)
        state_dict = {**{k: v for k, v in original.items() if k not in set(from_keys)}, **readable}

    modules: dict[str, _Module] = {}
    unrecognised: list[str] = []
    dtypes: Counter = Counter()
    for key, tensor in state_dict.items():
        if not isinstance(key, str) or not isinstance(tensor, torch.Tensor):
            raise LoraFormatError(f"{source}: entry {str(key)[:80]!r} is not a named tensor")
        dtypes[_dtype_name(tensor)] += 1
        split = split_key(key) if len(key) <= MAX_KEY_LENGTH else None
        if split is None:
            unrecognised.append(key)
            continue
        module_key, role = split
        module = modules.setdefault(module_key, _Module(module_key, {}, {}))
        if role in module.tensors:
            raise LoraFormatError(f"{source}: layer {module_key} appears twice (as {module.keys[role]!r} and {key!r})")
        module.tensors[role] = tensor
        module.keys[role] = key

    for module in list(modules.values()):
        suffixes = [module.keys[r][len(module.key):] for r in module.keys]
        module.parsed = parse_module(module.key, processor=any(x in ("_lora.up.weight", "_lora.down.weight") for x in suffixes),
                                     peft_default=any(x.endswith(".default.weight") for x in suffixes))
        if module.parsed is None:
            unrecognised.extend(module.keys.values())
            del modules[module.key]
            continue
        module.shape = _apparent_shape(module.tensors)

    match = None
    if spec is None:
        match = detect([Module(m.parsed, m.shape) for m in modules.values()])
        if match.family is None:
            raise LoraFormatError(
                f"{source}: no LoRA layers found ({len(state_dict)} keys, e.g. {str(next(iter(state_dict), ''))[:100]!r}); "
                f"this pack reads LoRAs of {', '.join(families.name_of(f) for f in families.FAMILY_IDS)}")
        spec = families.get(match.family)

    pieces: dict[str, list[_Piece]] = {}
    for module in modules.values():
        canonical = read_module(spec, Module(module.parsed, module.shape))
        if canonical is None:
            unrecognised.extend(module.keys.values())
            continue
        module.layout = LAYOUT_CLONEOFSIMO if module.keys.get("up") in converted else layout_of(module.parsed, canonical.vocabulary)
        pieces.setdefault(canonical.name, []).append(_Piece(module, canonical.parts))

    settings_by_component = header_settings(metadata, source)
    peft_settings = None
    if adapter_config is not None:
        where = adapter_config.get("__path__", f"{source}'s adapter_config.json")
        peft_settings = peft_settings_of(adapter_config, ALPHA_FROM_ADAPTER_CONFIG, where)
    matcher = PatternMatcher(source)
    rank_disagreements: list[str] = []

    layers: dict[str, LoraLayer] = {}
    layouts: Counter = Counter()
    placed: list[tuple[str, str]] = []
    dense_elements = 0
    for name, group in pieces.items():
        _check_overlaps(source, name, group)
        for piece in group:
            where = name if not piece.parts else f"{name} ({'/'.join(piece.parts)} of it, key {piece.module.key})"
            piece.layer = _read_piece(source, where, piece.module, spec, settings_by_component, peft_settings,
                                      matcher, rank_disagreements, unrecognised)
        group = [p for p in group if p.layer is not None]
        if not group:
            continue
        for piece in group:
            layouts[piece.module.layout] += len(piece.module.keys)
        layer = _place(source, spec, name, group)
        if layer is not group[0].layer:  # a placed weight: its whole size is checked too
            _validate_layer(source, name, layer.kind, layer.tensors, spec)
        if len(group) > 1 or group[0].parts:
            placed.append((group[0].module.key, name))
        layers[name] = layer
        if not (layer.is_low_rank and layer.mid is None):
            dense_elements += math.prod(layer.shape)
            if dense_elements > spec.max_dense_elements:
                raise LoraFormatError(
                    f"{source}: its layers without a low-rank form describe more than {spec.max_dense_elements:,} "
                    f"weights in all (all of {spec.name} has {spec.largest_model():,}); the file is damaged or built to "
                    "exhaust memory")

    notes += _notes(layers, unrecognised, rank_disagreements, settings_by_component, peft_settings, spec)
    if placed:
        notes.append(f"{len(placed)} weight(s) get LoRAs written for a part of them (e.g. {placed[0][0]} → rows of "
                     f"{placed[0][1]}): placed into those rows of the fused weight (a block-sparse LoRA of it)")
    if match is not None and len(match.candidates) > 1:
        notes.append(f"its keys and shapes fit {', '.join(families.name_of(f) for f in match.candidates)} equally well; "
                     f"read as {spec.name} (a merge settles this with its other inputs)")
    if unrecognised:
        log.warning("%s: %d keys not recognised as %s LoRA layers (e.g. %s)",
                    source, len(unrecognised), spec.name, unrecognised[0])
    if not layers:
        raise LoraFormatError(
            f"{source}: no LoRA layers found ({len(state_dict)} keys; read as {spec.name}, none is a layer of it)")
    ambiguous = match is not None and len(match.candidates) > 1
    # the raw tensors are kept only where the file may have to be read again for another family:
    # otherwise a file whose slices were placed into fused weights would be held twice
    lora = LoraFile(layers, metadata, layouts, unrecognised, source, notes, dtypes, spec.id,
                    match.candidates if match is not None else (spec.id,),
                    match.evidence if match is not None else f"read as {spec.name}, as asked",
                    origin if ambiguous else None)
    if check_values:
        check_finite(lora)
    return lora


def _check_overlaps(source: str, name: str, group: list[_Piece]) -> None:
    """Two modules of one file for the same rows of one weight: the file says one thing twice. (A
    LoRA of the whole weight and one of a part add up, as two patches would.)"""
    def key(piece: _Piece) -> str:
        return next(iter(piece.module.keys.values()))

    whole = [p for p in group if not p.parts]
    if len(whole) > 1:
        raise LoraFormatError(f"{source}: layer {name} appears twice (as {key(whole[0])!r} and {key(whole[1])!r})")
    seen: dict[str, _Piece] = {}
    for piece in group:
        for part in piece.parts:
            if part in seen:
                raise LoraFormatError(f"{source}: layer {name} ({part}) appears twice (as {key(seen[part])!r} and "
                                      f"{key(piece)!r})")
            seen[part] = piece


def _read_piece(source: str, where: str, module: _Module, spec: families.FamilySpec, settings_by_component: dict,
                peft_settings: PeftSettings | None, matcher: PatternMatcher, rank_disagreements: list[str],
                unrecognised: list[str]) -> LoraLayer | None:
    tensors = dict(module.tensors)
    alpha_t = tensors.pop("alpha", None)
    alpha = _alpha_value(source, where, alpha_t) if alpha_t is not None else None
    if "diff_b" in tensors and "diff" not in tensors and not ({"up", "hada_w1_a", "lokr_w1", "lokr_w1_a"} & tensors.keys()):
        unrecognised.append(module.keys["diff_b"])  # a bias-only difference: nothing we merge
        return None
    kind = _adapter_kind(tensors)
    if kind is None:
        raise LoraFormatError(f"{source}: layer {where} has an incomplete adapter (found {sorted(tensors)})")
    _validate_layer(source, where, kind, tensors, spec)
    layer = LoraLayer(kind, tensors, alpha)
    if alpha is None and layer.uses_alpha:
        parsed = module.parsed
        settings = peft_settings if parsed.component == "peft" else settings_by_component.get(parsed.component)
        if settings is not None:
            layer.alpha = _alpha_from_settings(settings, layer, parsed.path, matcher, rank_disagreements, where)
            layer.alpha_source = settings.origin
    return layer


def _place(source: str, spec: families.FamilySpec, name: str, group: list[_Piece]) -> LoraLayer:
    """One weight's layer from its pieces. A single piece for the whole weight is the layer as the
    file has it (no copy). Pieces for parts of a fused weight (diffusers' to_q/to_k/to_v of Flux's
    qkv) become one block-sparse layer of the whole weight: for low-rank pieces a LoRA whose up has
    each piece's up in that piece's rows and zeros elsewhere and whose down stacks the pieces'
    downs (rank = the sum of theirs, exact; held as the pieces themselves, hypernet/row_blocks.py);
    other adapters as one dense difference."""
    if len(group) == 1 and not group[0].parts:
        return group[0].layer
    first = group[0].layer
    width = first.shape[1:]
    for piece in group:
        if piece.layer.shape[1:] != width:
            raise LoraFormatError(
                f"{source}: layer {name}: its parts read different inputs ({piece.module.key}: "
                f"{tuple(piece.layer.shape)}, {group[0].module.key}: {tuple(first.shape)}); a fused weight's parts "
                "must all read the same input")
        if piece.layer.is_dora:
            raise LoraFormatError(
                f"{source}: layer {name}: a DoRA adapter for a part of a fused weight ({piece.module.key}): DoRA rescales "
                "whole rows of the weight it was trained on, which cannot be reconciled with the fused weight "
                f"{name}; merge it with a LoRA of the same key layout in ComfyUI's own loaders instead")
    total = spec.fused_rows(name, width[0])
    rows_of = []
    for piece in group:
        rows = list(range(piece.layer.shape[0])) if not piece.parts else spec.part_rows(name, piece.parts, width[0])
        if piece.parts and (rows is None or len(rows) != piece.layer.shape[0]):
            expected = "" if rows is None else f"{len(rows)} rows"
            raise LoraFormatError(
                f"{source}: layer {name}: {piece.module.key} is its {'/'.join(piece.parts)} part, which at input width "
                f"{width[0]} has {expected or 'no known size'}; the file's factors give {piece.layer.shape[0]} rows "
                "(fused and unfused layouts of different models)")
        if not piece.parts:
            if total is not None and piece.layer.shape[0] != total:
                raise LoraFormatError(f"{source}: layer {name}: {piece.module.key} has {piece.layer.shape[0]} rows; "
                                      f"the fused weight has {total} at input width {width[0]}")
            total = piece.layer.shape[0]
        rows_of.append(rows)
    if total is None:
        raise LoraFormatError(f"{source}: layer {name}: its parts do not say how large the fused weight is")
    if all(p.layer.is_low_rank and p.layer.mid is None for p in group):
        return _place_low_rank(group, rows_of, total)
    delta = torch.zeros((total, *width), dtype=torch.float32)
    for piece, rows in zip(group, rows_of):
        delta.index_add_(0, torch.tensor(rows), piece.layer.delta().reshape(len(rows), *width))
    return LoraLayer(FULL, {"diff": delta})


def _place_low_rank(group: list[_Piece], rows_of: list[list[int]], total: int) -> LoraLayer:
    """The block-sparse LoRA of the whole weight from low-rank pieces: its up a `RowBlocks` of the
    pieces' ups (no zeros held), its down a `Stacked` of their downs (no copy)."""
    layers = [p.layer for p in group]
    ranks = [layer.rank for layer in layers]
    scales = {layer.scale for layer in layers}
    no_alpha = all(layer.alpha is None for layer in layers)
    # one shared scale (the common case: one trainer, one alpha) stays in alpha and the factors keep
    # their dtype (the pieces' ups are the file's tensors, not copies); different scales go into
    # each piece's up, in float32
    shared = len(scales) == 1
    dtypes = {layer.up.dtype for layer in layers} | {layer.down.dtype for layer in layers}
    dtype = dtypes.pop() if shared and len(dtypes) == 1 else torch.float32
    ups = [layer.up.to(dtype) if shared else layer.up.float() * layer.scale for layer in layers]
    up = row_blocks.of_pieces(ups, rows_of, total)
    down = Stacked(tuple(layer.down.to(dtype) for layer in layers))
    if no_alpha:
        return LoraLayer(LOW_RANK, {"up": up, "down": down})
    sources = {layer.alpha_source for layer in layers}
    alpha = scales.pop() * sum(ranks) if shared else float(sum(ranks))
    return LoraLayer(LOW_RANK, {"up": up, "down": down}, alpha,
                     sources.pop() if len(sources) == 1 else ALPHA_FROM_TENSOR)


def _alpha_from_settings(settings: PeftSettings, layer: LoraLayer, module: str, matcher: PatternMatcher,
                         disagreements: list[str], name: str) -> float:
    """The kohya-equivalent alpha (scale = alpha / rank) that peft's settings give this layer."""
    rank_key = matcher.first(settings.rank_pattern, module)
    configured_rank = settings.rank_pattern[rank_key] if rank_key is not None else settings.r
    if configured_rank != layer.rank:
        disagreements.append(f"{name} (settings say rank {configured_rank}, its factors have {layer.rank})")
    alpha_key = matcher.first(settings.alpha_pattern, module)
    alpha = settings.alpha_pattern[alpha_key] if alpha_key is not None else settings.alpha
    if settings.use_rslora and layer.kind == LOW_RANK:
        return alpha * layer.rank / math.sqrt(layer.rank)  # peft: scale = alpha / √r
    return alpha


def _notes(layers: dict[str, LoraLayer], unrecognised: list[str], rank_disagreements: list[str],
           header_settings: dict, peft_settings: PeftSettings | None, spec: families.FamilySpec) -> list[str]:
    """The facts about how a file was read that a user must see (inspect, merge reports)."""
    notes = []
    sources = Counter(layer.alpha_source for layer in layers.values() if layer.uses_alpha)
    if sources.get(ALPHA_FROM_HEADER):
        notes.append(f"alpha of {sources[ALPHA_FROM_HEADER]} layer(s) read from the header's lora_adapter_metadata "
                     f"(diffusers save_lora_weights; components {', '.join(sorted(header_settings))})")
    if sources.get(ALPHA_FROM_ADAPTER_CONFIG):
        notes.append(f"alpha of {sources[ALPHA_FROM_ADAPTER_CONFIG]} layer(s) read from {peft_settings.where} "
                     "(peft save_pretrained" + (", use_rslora: scale alpha/sqrt(rank)" if peft_settings.use_rslora else "")
                     + ")")
    assumed = [name for name, layer in layers.items() if layer.uses_alpha and layer.alpha is None]
    if assumed:
        notes.append(f"no alpha anywhere for {len(assumed)} of {len(layers)} layer(s) (e.g. {assumed[0]}): "
                     "scale 1 (alpha = rank) assumed")
    if rank_disagreements:
        notes.append(f"{len(rank_disagreements)} layer(s) have another rank than their peft settings say, e.g. "
                     f"{rank_disagreements[0]}; the factors' rank is used")
    if unrecognised:
        embeddings = [k for k in unrecognised if str(k).startswith("<") and str(k).endswith(">")]
        notes.append(f"{len(unrecognised)} key(s) not recognised as {spec.name} LoRA layers and left out "
                     f"(e.g. {str(unrecognised[0])[:120]})"
                     + (f"; {len(embeddings)} of them are textual-inversion embeddings ({', '.join(embeddings[:3])}), "
                        "which a LoRA merge does not carry" if embeddings else ""))
    return notes


def all_finite(tensor: torch.Tensor) -> bool:
    """Whether no value is NaN or ±Inf, in one read of the tensor and no mask: any NaN or ±Inf
    makes the sum NaN or ±Inf, and a float32 sum of finite values is finite unless it overflows —
    never for fp16 (|x| ≤ 65504); for wider dtypes a non-finite sum is settled value by value.
    (7x faster than isfinite().all() on fp16 factors; it was 60% of reading a file.)"""
    return math.isfinite(float(tensor.sum(dtype=torch.float32))) or bool(torch.isfinite(tensor).all())


def non_finite_layers(lora: LoraFile) -> list[str]:
    """Layers with a NaN or Inf anywhere in their tensors (alpha is checked when read)."""
    return [name for name, layer in lora.layers.items()
            if not all(all_finite(t) for t in layer.held_tensors())]


def check_finite(lora: LoraFile) -> None:
    bad = non_finite_layers(lora)
    if bad:
        raise LoraFormatError(
            f"{lora.source}: {len(bad)} layer(s) contain NaN or Inf values (first: {bad[0]}); "
            "the file is damaged or was saved from a diverged training run")


def read_lora(path: str | Path, check_values: bool = True, family: str | None = None) -> LoraFile:
    """Read a LoRA file (or a folder that peft's save_pretrained wrote: its adapter_model.safetensors
    with the adapter_config.json beside it); `family`: read it as that family instead of detecting."""
    path = Path(path)
    if path.is_dir() and (path / "adapter_model.safetensors").is_file():
        path = path / "adapter_model.safetensors"
    tensors, metadata = load_safetensors(path)
    return lora_from_state_dict(tensors, metadata, source=str(path), adapter_config=adapter_config_for(path),
                                check_values=check_values, family=family)
