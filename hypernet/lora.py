"""Read any SDXL LoRA into one canonical form.

`read_lora(path)` / `lora_from_state_dict(sd)` return a `LoraFile`: per layer (canonical name,
see naming.py) a `LoraLayer` with the factors up/down (+ mid for Tucker conv), alpha and the
adapter kind. Naming families are detected per key by signature, never by file name.
Tensors keep the file's dtype; maths happens in float32 on demand.

Where alpha comes from, first found wins (per layer):
1. an `.alpha` tensor beside the factors (kohya, LyCORIS, ComfyUI, diffusers' kohya exporter);
2. the safetensors header entry `lora_adapter_metadata` (diffusers' `save_lora_weights`: a JSON
   object with per-component peft settings `unet.r`, `unet.lora_alpha`, `unet.rank_pattern`,
   `unet.alpha_pattern`, `unet.use_rslora`, `text_encoder.…`, `text_encoder_2.…`);
3. `adapter_config.json` beside an `adapter_model.safetensors` (peft's `save_pretrained`);
4. nowhere: scale 1 (alpha = rank) is assumed, and the LoraFile says so (`scale_assumed_layers`,
   `notes`) so that inspect and merge reports can.
`rank_pattern`/`alpha_pattern` keys are matched against module names with peft's own rule: the
first key (in the file's order) for which `re.match(rf"(.*\\.)?({key})$", module)` succeeds.
With `use_rslora` the scale is alpha/√r instead of alpha/r. `LoraLayer.alpha` always holds the
kohya-equivalent alpha (scale = alpha / rank), so everything downstream reads one convention.

What a file may ask for (a hostile file must fail fast and small, never by exhausting memory):
every factor is checked against the others *before* anything is expanded, no layer may
adapt a weight of more than MAX_LAYER_ELEMENTS elements (2^26 = 67,108,864, 256 MiB in float32;
SDXL's largest weight, an output-block conv, has 29.5 M), and the layers that a merge must expand
(no low-rank form) may not add up to more than MAX_FILE_DENSE_ELEMENTS (2^32, about all of SDXL).
Reading itself never expands anything: its memory is that of the file's tensors.
"""

from __future__ import annotations

import logging
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import naming
from .errors import LoraFormatError
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
from .safetensors_io import load_safetensors

log = logging.getLogger(__name__)

LOW_RANK = "lora"          # up @ down (+ Tucker mid), possibly with a DoRA magnitude
LOHA = "loha"
LOKR = "lokr"
FULL = "full"              # a stored weight difference (`.diff`)

# Caps on what a file may ask for (see the module docstring).
MAX_LAYER_ELEMENTS = 1 << 26
# Sum over the layers without a low-rank form (LoHa, LoKr, DoRA, .diff, Tucker), which a merge
# expands to dense ΔW: SDXL's UNet and both text encoders have ~3.5 G weights, so no real file asks
# for more than 2^32; a small file listing thousands of capped layers would otherwise.
MAX_FILE_DENSE_ELEMENTS = 1 << 32
MAX_KEY_LENGTH = 512         # the longest real SDXL key is ~100 characters

FACTOR_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# Naming families, named by what writes them.
FAMILY_KOHYA = "kohya"  # sd-scripts, LyCORIS, most trainers and published files
FAMILY_KOHYA_DIFFUSERS = "kohya with diffusers names"  # diffusers' kohya exporter, OneTrainer
FAMILY_DIFFUSERS = "diffusers save_lora_weights"  # current diffusers training scripts (and LoRA.rar's)
FAMILY_DIFFUSERS_PROCESSOR = "diffusers attention processors (diffusers <= 0.20)"
FAMILY_PEFT_STATE_DICT = "peft state dict with adapter name"  # a raw `model.state_dict()`
FAMILY_PEFT = "peft save_pretrained"
FAMILY_COMFYUI = "ComfyUI"

# Tensor suffix → (role). Longest first, matched against the end of each key.
_SUFFIX_ROLES = (
    (".lora_A.default.weight", "down"), (".lora_B.default.weight", "up"),
    (".lora_linear_layer.down.weight", "down"), (".lora_linear_layer.up.weight", "up"),
    ("_lora.down.weight", "down"), ("_lora.up.weight", "up"),
    (".lora.down.weight", "down"), (".lora.up.weight", "up"),
    (".lora_down.weight", "down"), (".lora_up.weight", "up"), (".lora_mid.weight", "mid"),
    (".lora_A.weight", "down"), (".lora_B.weight", "up"),
    (".lora_magnitude_vector", "dora_scale"), (".dora_scale", "dora_scale"),
    (".hada_w1_a", "hada_w1_a"), (".hada_w1_b", "hada_w1_b"),
    (".hada_w2_a", "hada_w2_a"), (".hada_w2_b", "hada_w2_b"),
    (".hada_t1", "hada_t1"), (".hada_t2", "hada_t2"),
    (".lokr_w1_a", "lokr_w1_a"), (".lokr_w1_b", "lokr_w1_b"),
    (".lokr_w2_a", "lokr_w2_a"), (".lokr_w2_b", "lokr_w2_b"),
    (".lokr_w1", "lokr_w1"), (".lokr_w2", "lokr_w2"), (".lokr_t2", "lokr_t2"),
    (".diff_b", "diff_b"), (".diff", "diff"), (".alpha", "alpha"),
)


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
    """One adapted layer. `tensors` holds the raw factors by role (up, down, mid, hada_w1_a, …).

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
        return self.tensors["up"]

    @property
    def down(self) -> torch.Tensor:
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
            return self.down.shape[0]
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
    """A LoRA in canonical form.

    Facts for reports (what a merge must say, not only log): `unrecognised_keys` (left out of
    every layer), `scale_assumed_layers` (alpha found nowhere: scale 1 assumed),
    `alpha_sources` (how many layers took alpha from where), `notes` (those facts as sentences).
    """

    layers: dict[str, LoraLayer]
    metadata: dict[str, str] = field(default_factory=dict)
    naming_families: Counter = field(default_factory=Counter)
    unrecognised_keys: list[str] = field(default_factory=list)
    source: str = ""
    notes: list[str] = field(default_factory=list)
    tensor_dtypes: Counter = field(default_factory=Counter)  # every tensor of the file, alphas too

    @property
    def unet_layers(self) -> dict[str, LoraLayer]:
        return {k: v for k, v in self.layers.items() if not naming.is_text_encoder(k)}

    @property
    def text_encoder_layers(self) -> dict[str, LoraLayer]:
        return {k: v for k, v in self.layers.items() if naming.is_text_encoder(k)}

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
            split = _split_key(key)
            modules.append(split[0] if split else key)
        return sorted(set(modules))

    def kinds(self) -> Counter:
        return Counter("dora" if layer.is_dora else layer.kind for layer in self.layers.values())


def _split_key(key: str) -> tuple[str, str] | None:
    for suffix, role in _SUFFIX_ROLES:
        if key.endswith(suffix):
            return key[: -len(suffix)], role
    return None


# ---------------------------------------------------------------------------------------------
# Key → canonical layer name

@dataclass(frozen=True)
class _Key:
    name: str       # canonical layer name; "te?." for a peft text encoder decided by width later
    role: str
    family: str
    component: str  # whose peft settings apply: "unet", "text_encoder", "text_encoder_2", "peft", ""
    module: str     # the module path inside that component, as peft names it (for the patterns)


_OLD_TEXT_PROCESSOR = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj", "to_out.0": "out_proj"}
_DIFFUSERS_UNET_ROOTS = ("down_blocks", "up_blocks", "mid_block", "conv_in", "conv_out", "time_embedding",
                         "add_embedding")


def _diffusers_family(key: str) -> str:
    if key.endswith(("_lora.up.weight", "_lora.down.weight")):
        return FAMILY_DIFFUSERS_PROCESSOR
    if key.endswith((".default.weight",)):
        return FAMILY_PEFT_STATE_DICT
    return FAMILY_DIFFUSERS


def _parse_key(key: str) -> _Key | None:
    if len(key) > MAX_KEY_LENGTH:
        return None
    split = _split_key(key)
    if split is None:
        return None
    module, role = split
    processor = key.endswith(("_lora.up.weight", "_lora.down.weight"))
    if processor:
        # diffusers <= 0.20 attention processors: `…attn1.processor.to_out_lora.up.weight`
        # is the layer `…attn1.to_out.0`
        module = module.replace(".processor.", ".")
        if module.endswith(".to_out"):
            module += ".0"
    if m := re.match(r"lora_unet_(.+)$", module):
        flat = m.group(1)
        family = FAMILY_KOHYA_DIFFUSERS if flat.startswith(("down_blocks", "up_blocks", "mid_block")) else FAMILY_KOHYA
        return _Key(naming.kohya_unet_to_ldm(flat), role, family, "", "")
    if m := re.match(r"lora_te([12]?)_(.+)$", module):
        flat = m.group(2)
        family = FAMILY_KOHYA_DIFFUSERS if flat.startswith(("encoder_", "embeddings_")) else FAMILY_KOHYA
        return _Key(naming.kohya_text_to_canonical(f"te{m.group(1) or '1'}", flat), role, family, "", "")
    if m := re.match(r"(?:base_model\.model\.)?(?:model\.)?diffusion_model\.(.+)$", module):
        return _Key(m.group(1), role, FAMILY_COMFYUI, "", "")
    if m := re.match(r"unet\.(.+)$", module):
        inner = m.group(1)
        # the official LoRA.rar training wrote a doubled `unet.unet.` prefix
        path = re.sub(r"^(?:unet\.)+", "", inner).replace(".processor.", ".").replace("to_out_", "to_out.0_")
        path = re.sub(r"\.processor$", "", path)
        return _Key(naming.diffusers_to_ldm(path), role, _diffusers_family(key), "unet", inner)
    if m := re.match(r"(text_encoder(?:_2)?)\.(.+)$", module):
        component, path = m.groups()
        if processor:
            head, _, proj = path.rpartition(".self_attn.")
            path = f"{head}.self_attn.{_OLD_TEXT_PROCESSOR.get(proj, proj)}" if head else path
        encoder = "te2" if component == "text_encoder_2" else "te1"
        return _Key(naming.text_encoder_canonical(encoder, path), role, _diffusers_family(key), component, m.group(2))
    if m := re.match(r"base_model\.model\.(.+)$", module):
        inner = m.group(1)
        if inner.startswith(_DIFFUSERS_UNET_ROOTS):
            return _Key(naming.diffusers_to_ldm(inner), role, FAMILY_PEFT, "peft", inner)
        if re.match(r"(?:text_model\.)?(?:encoder|embeddings)\.", inner):
            # a peft-wrapped CLIP: which of SDXL's two it is, only the width tells (768 or 1280)
            return _Key(naming.text_encoder_canonical("te?", inner), role, FAMILY_PEFT, "peft", inner)
    return None


_LDM_NAME = re.compile(
    r"^(input_blocks\.\d+\.\d+|middle_block\.\d+|output_blocks\.\d+\.\d+|time_embed\.\d+|"
    r"label_emb\.0\.\d+|out\.\d+)(\.|$)")
_TEXT_NAME = re.compile(r"^te[12?]\.text_model\.")
# CLIP widths in SDXL: CLIP-L (te1) 768, CLIP-G (te2) 1280.
_TEXT_ENCODER_BY_WIDTH = {768: "te1", 1280: "te2"}


# ---------------------------------------------------------------------------------------------
# Validation: before anything is expanded, every factor must fit the others.

def _validate_layer(source: str, name: str, kind: str, t: dict[str, torch.Tensor]) -> None:
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
    if math.prod(shape) > MAX_LAYER_ELEMENTS:
        raise LoraFormatError(
            f"{where}: its factors describe a {'×'.join(map(str, shape))} weight ({math.prod(shape):,} elements); "
            f"at most {MAX_LAYER_ELEMENTS:,} are accepted (SDXL's largest weight has 29,491,200)")


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


def lora_from_state_dict(state_dict: dict[str, torch.Tensor], metadata: dict[str, str] | None = None,
                         source: str = "LoRA", adapter_config: dict | None = None,
                         check_values: bool = True) -> LoraFile:
    """Turn a raw LoRA state dict (any naming family) into a LoraFile — the one reader behind
    `read_lora` (CLI, library) and the nodes' LORA_MODEL inputs, so all get the same checks and
    messages.

    `metadata` is the safetensors header metadata (diffusers keeps alpha there, in
    `lora_adapter_metadata`); `adapter_config` is a parsed `adapter_config.json` for peft's
    `base_model.model.…` keys (see `adapter_config_for`). `check_values`: refuse NaN/Inf in any
    factor (`check_finite`); only `inspect`, which reports them instead, turns it off."""
    metadata = dict(metadata or {})
    groups: dict[str, dict[str, torch.Tensor]] = {}
    first_key: dict[str, _Key] = {}
    key_of: dict[tuple[str, str], str] = {}
    families: Counter = Counter()
    unrecognised: list[str] = []
    dtypes: Counter = Counter()
    for key, tensor in state_dict.items():
        if not isinstance(key, str) or not isinstance(tensor, torch.Tensor):
            raise LoraFormatError(f"{source}: entry {str(key)[:80]!r} is not a named tensor")
        dtypes[_dtype_name(tensor)] += 1
        parsed = _parse_key(key)
        if parsed is None or not (_LDM_NAME.match(parsed.name) or _TEXT_NAME.match(parsed.name)):
            unrecognised.append(key)
            continue
        families[parsed.family] += 1
        slot = groups.setdefault(parsed.name, {})
        if parsed.role in slot:
            raise LoraFormatError(f"{source}: layer {parsed.name} appears twice (as {key_of[parsed.name, parsed.role]!r} "
                                  f"and {key!r})")
        slot[parsed.role] = tensor
        key_of[parsed.name, parsed.role] = key
        first_key.setdefault(parsed.name, parsed)

    _name_peft_text_encoders(groups, first_key, key_of, unrecognised)

    settings_by_component = header_settings(metadata, source)
    peft_settings = None
    if adapter_config is not None:
        where = adapter_config.get("__path__", f"{source}'s adapter_config.json")
        peft_settings = peft_settings_of(adapter_config, ALPHA_FROM_ADAPTER_CONFIG, where)
    matcher = PatternMatcher(source)
    rank_disagreements: list[str] = []

    layers: dict[str, LoraLayer] = {}
    dense_elements = 0
    for name, tensors in groups.items():
        alpha_t = tensors.pop("alpha", None)
        alpha = _alpha_value(source, name, alpha_t) if alpha_t is not None else None
        if "diff_b" in tensors and "diff" not in tensors and not ({"up", "hada_w1_a", "lokr_w1", "lokr_w1_a"} & tensors.keys()):
            unrecognised.append(key_of[name, "diff_b"])  # a bias-only difference: nothing we merge
            continue
        kind = _adapter_kind(tensors)
        if kind is None:
            raise LoraFormatError(
                f"{source}: layer {name} has an incomplete adapter (found {sorted(tensors)})")
        _validate_layer(source, name, kind, tensors)
        layer = LoraLayer(kind, tensors, alpha)
        if alpha is None and layer.uses_alpha:
            key = first_key[name]
            settings = peft_settings if key.component == "peft" else settings_by_component.get(key.component)
            if settings is not None:
                layer.alpha = _alpha_from_settings(settings, layer, key.module, matcher, rank_disagreements, name)
                layer.alpha_source = settings.origin
        layers[name] = layer
        if not (layer.is_low_rank and layer.mid is None):
            dense_elements += math.prod(layer.shape)
            if dense_elements > MAX_FILE_DENSE_ELEMENTS:
                raise LoraFormatError(
                    f"{source}: its layers without a low-rank form describe more than {MAX_FILE_DENSE_ELEMENTS:,} "
                    "weights in all (all of SDXL has ~3.5 G); the file is damaged or built to exhaust memory")

    notes = _notes(layers, unrecognised, rank_disagreements, settings_by_component, peft_settings)
    if unrecognised:
        log.warning("%s: %d keys not recognised as SDXL LoRA layers (e.g. %s)",
                    source, len(unrecognised), unrecognised[0])
    if not layers:
        family = guess_family_from_keys([str(k) for k in state_dict], source)
        raise LoraFormatError(
            f"{source}: no LoRA layers found ({len(state_dict)} keys"
            + (f"; it looks like {family}" if family else "") + ")")
    lora = LoraFile(layers, metadata, families, unrecognised, source, notes, dtypes)
    if check_values:
        check_finite(lora)
    return lora


def _name_peft_text_encoders(groups: dict, first_key: dict, key_of: dict, unrecognised: list[str]) -> None:
    """peft's `base_model.model.encoder.layers.N…` does not say which CLIP it wraps; SDXL's two
    differ in width (CLIP-L 768, CLIP-G 1280), so the factors' shapes decide."""
    for name in [n for n in groups if n.startswith("te?.")]:
        tensors = groups.pop(name)
        up, down = tensors.get("up"), tensors.get("down")
        width = None
        if up is not None and down is not None and up.dim() >= 1 and down.dim() >= 2:
            width = min(up.shape[0], down.shape[1])
        encoder = _TEXT_ENCODER_BY_WIDTH.get(width)
        target = f"{encoder}.{name[4:]}" if encoder else None
        if target is None or target in groups:
            unrecognised.extend(key_of[name, role] for role in tensors)
            continue
        groups[target] = tensors
        first_key[target] = first_key[name]
        for role in tensors:
            key_of[target, role] = key_of[name, role]


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
           header_settings: dict, peft_settings: PeftSettings | None) -> list[str]:
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
        notes.append(f"{len(unrecognised)} key(s) not recognised as SDXL LoRA layers and left out "
                     f"(e.g. {unrecognised[0][:120]})")
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
            if not all(all_finite(t) for t in layer.tensors.values())]


def check_finite(lora: LoraFile) -> None:
    bad = non_finite_layers(lora)
    if bad:
        raise LoraFormatError(
            f"{lora.source}: {len(bad)} layer(s) contain NaN or Inf values (first: {bad[0]}); "
            "the file is damaged or was saved from a diverged training run")


def read_lora(path: str | Path, check_values: bool = True) -> LoraFile:
    """Read a LoRA file (or a folder that peft's save_pretrained wrote: its adapter_model.safetensors
    with the adapter_config.json beside it)."""
    path = Path(path)
    if path.is_dir() and (path / "adapter_model.safetensors").is_file():
        path = path / "adapter_model.safetensors"
    tensors, metadata = load_safetensors(path)
    return lora_from_state_dict(tensors, metadata, source=str(path), adapter_config=adapter_config_for(path),
                                check_values=check_values)


# ---------------------------------------------------------------------------------------------
# Base-family detection: by the shapes a LoRA touches, never by its file name.

_FLUX_KEYS = re.compile(r"double_blocks|single_blocks|single_transformer_blocks|img_attn|txt_attn")
_SD3_KEYS = re.compile(r"joint_blocks|context_block")


def guess_family_from_keys(keys: list[str], source: str = "") -> str | None:
    joined = "\n".join(keys[:2000])
    if _FLUX_KEYS.search(joined):
        return "Flux (double/single transformer blocks)"
    if _SD3_KEYS.search(joined):
        return "SD3 (joint blocks)"
    return None


@dataclass
class FamilyGuess:
    family: str              # "sdxl", "sd15", "sd2", "unknown"
    evidence: str
    attention_widths: tuple[int, ...]
    context_dim: int | None


def guess_family(lora: LoraFile) -> FamilyGuess:
    widths, contexts = set(), set()
    for name, layer in lora.unet_layers.items():
        if name.endswith("attn1.to_q"):
            widths.add(layer.shape[0])
        elif name.endswith("attn2.to_k"):
            contexts.add(layer.shape[1])
    context = max(contexts) if contexts else None
    w = tuple(sorted(widths))
    describe = (f"{'/'.join(map(str, w)) or 'no'}-wide attention"
                + (f", {context}-wide text context" if context else ""))
    if 320 in widths or any(n.startswith("input_blocks.1.1.") for n in lora.layers):
        family = "sd2" if context == 1024 else "sd15"
    elif context == 2048 or (widths and widths <= {640, 1280}):
        family = "sdxl"
    elif any(n.startswith("te2.") for n in lora.layers):
        family = "sdxl"
    elif not widths and lora.unet_layers:
        family = "sdxl" if all(n.split(".")[0] in ("input_blocks", "middle_block", "output_blocks")
                               for n in lora.unet_layers) else "unknown"
    else:
        family = "unknown"
    return FamilyGuess(family, describe, w, context)


FAMILY_NAMES = {"sdxl": "SDXL", "sd15": "SD1.5", "sd2": "SD2", "unknown": "an unknown model"}


def require_family(lora: LoraFile, expected: str, role: str) -> FamilyGuess:
    """Raise if `lora` does not look like `expected`; `role` names it ("style LoRA")."""
    guess = guess_family(lora)
    if guess.family != expected and guess.family != "unknown":
        raise LoraFormatError(
            f"{role} {lora.source} looks like {FAMILY_NAMES[guess.family]} ({guess.evidence}); "
            f"expected {FAMILY_NAMES.get(expected, expected)}")
    return guess
