"""Read any SDXL LoRA into one canonical form.

`read_lora(path)` / `lora_from_state_dict(sd)` return a `LoraFile`: per layer (canonical name,
see naming.py) a `LoraLayer` with the factors up/down (+ mid for Tucker conv), alpha and the
adapter kind. Naming families are detected per key by signature, never by file name.
Tensors keep the file's dtype; maths happens in float32 on demand.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import naming
from .errors import LoraFormatError
from .safetensors_io import load_safetensors

log = logging.getLogger(__name__)

LOW_RANK = "lora"          # up @ down (+ Tucker mid), possibly with a DoRA magnitude
LOHA = "loha"
LOKR = "lokr"
FULL = "full"              # a stored weight difference (`.diff`)

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


@dataclass
class LoraLayer:
    """One adapted layer. `tensors` holds the raw factors by role (up, down, mid, hada_w1_a, …)."""

    kind: str
    tensors: dict[str, torch.Tensor]
    alpha: float | None = None

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
    def scale(self) -> float:
        """alpha / rank; 1 without alpha (and for adapters whose factors are full)."""
        if self.alpha is None or self.rank == 0:
            return 1.0
        if self.kind == LOKR and not ({"lokr_w1_b", "lokr_w2_b"} & self.tensors.keys()):
            return 1.0
        return self.alpha / self.rank

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of the weight this layer adapts: (out, in) or (out, in, k, k)."""
        if self.kind == LOW_RANK:
            out = self.up.shape[0]
            if self.mid is not None:
                return (out, self.down.shape[1], *self.mid.shape[2:])
            return (out, *self.down.shape[1:])
        return tuple(self.delta().shape)

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
            return torch.kron(w1, w2) * self.scale
        return t["diff"]


@dataclass
class LoraFile:
    """A LoRA in canonical form."""

    layers: dict[str, LoraLayer]
    metadata: dict[str, str] = field(default_factory=dict)
    naming_families: Counter = field(default_factory=Counter)
    unrecognised_keys: list[str] = field(default_factory=list)
    source: str = ""

    @property
    def unet_layers(self) -> dict[str, LoraLayer]:
        return {k: v for k, v in self.layers.items() if not naming.is_text_encoder(k)}

    @property
    def text_encoder_layers(self) -> dict[str, LoraLayer]:
        return {k: v for k, v in self.layers.items() if naming.is_text_encoder(k)}

    def kinds(self) -> Counter:
        return Counter("dora" if layer.is_dora else layer.kind for layer in self.layers.values())


def _split_key(key: str) -> tuple[str, str] | None:
    for suffix, role in _SUFFIX_ROLES:
        if key.endswith(suffix):
            return key[: -len(suffix)], role
    return None


# Module prefix patterns → (naming family, function that gives the canonical name).
def _canonical_module(module: str) -> tuple[str, str] | None:
    """Map a module prefix in any naming family to (family, canonical layer name)."""
    if m := re.match(r"lora_unet_(.+)$", module):
        flat = m.group(1)
        family = "kohya (diffusers blocks)" if flat.startswith(("down_blocks", "up_blocks", "mid_block")) else "kohya"
        return family, naming.kohya_unet_to_ldm(flat)
    if m := re.match(r"lora_te([12]?)_(.+)$", module):
        return "kohya", naming.kohya_text_to_canonical(f"te{m.group(1) or '1'}", m.group(2))
    if m := re.match(r"(?:base_model\.model\.)?(?:model\.)?diffusion_model\.(.+)$", module):
        return "comfyui", m.group(1)
    if m := re.match(r"(?:unet\.)+(.+)$", module):
        path = m.group(1).replace(".processor.", ".").replace("to_out_", "to_out.0_")
        path = re.sub(r"\.processor$", "", path)
        return "diffusers", naming.diffusers_to_ldm(path)
    if m := re.match(r"(text_encoder(?:_2)?)\.(.+)$", module):
        encoder = "te2" if m.group(1) == "text_encoder_2" else "te1"
        return "diffusers", f"{encoder}.{m.group(2)}"
    if m := re.match(r"base_model\.model\.((?:down|up|mid)_blocks?\..+)$", module):
        return "peft", naming.diffusers_to_ldm(m.group(1))
    return None


def _refine_family(family: str, key: str) -> str:
    """The module prefix says diffusers; the tensor suffix says which diffusers writer."""
    if family != "diffusers":
        return family
    if ".lora_A." in key or ".lora_B." in key:
        return "peft"
    if "_lora.up." in key or "_lora.down." in key:
        return "diffusers (attention processor)"
    return "diffusers (old)"


def _fix_old_diffusers(module: str, role: str, key: str) -> tuple[str, str]:
    """Old diffusers attention processors write `…attn1.processor.to_out_lora.up.weight`:
    module prefix `…attn1.processor.to_out`; the LDM layer is `to_out.0`."""
    if key.endswith(("_lora.up.weight", "_lora.down.weight")):
        module = module.replace(".processor.", ".")
        if module.endswith(".to_out"):
            module += ".0"
    return module, role


_LDM_NAME = re.compile(
    r"^(input_blocks\.\d+\.\d+|middle_block\.\d+|output_blocks\.\d+\.\d+|time_embed\.\d+|"
    r"label_emb\.0\.\d+|out\.\d+)(\.|$)")
_TEXT_NAME = re.compile(r"^te[12]\.text_model\.")


def lora_from_state_dict(state_dict: dict[str, torch.Tensor], metadata: dict[str, str] | None = None,
                         source: str = "LoRA") -> LoraFile:
    """Turn a raw LoRA state dict (any naming family) into a LoraFile."""
    groups: dict[str, dict[str, torch.Tensor]] = {}
    families: Counter = Counter()
    unrecognised: list[str] = []
    for key, tensor in state_dict.items():
        split = _split_key(key)
        mapped = None
        if split:
            module, role = _fix_old_diffusers(*split, key)
            mapped = _canonical_module(module)
        if mapped is None or not (_LDM_NAME.match(mapped[1]) or _TEXT_NAME.match(mapped[1])):
            unrecognised.append(key)
            continue
        family, name = mapped
        families[_refine_family(family, key)] += 1
        slot = groups.setdefault(name, {})
        if role in slot:
            raise LoraFormatError(f"{source}: layer {name} appears twice (second time as {key!r})")
        slot[role] = tensor

    layers: dict[str, LoraLayer] = {}
    for name, tensors in groups.items():
        alpha_t = tensors.pop("alpha", None)
        alpha = float(alpha_t.float().item()) if alpha_t is not None else None
        if "diff_b" in tensors and "diff" not in tensors and not ({"up", "hada_w1_a", "lokr_w1", "lokr_w1_a"} & tensors.keys()):
            unrecognised.append(f"{name}.diff_b")  # a bias-only difference: nothing we merge
            continue
        kind = _adapter_kind(tensors)
        if kind is None:
            raise LoraFormatError(
                f"{source}: layer {name} has an incomplete adapter (found {sorted(tensors)})")
        layers[name] = LoraLayer(kind, tensors, alpha)
        _check_shapes(source, name, layers[name])

    if unrecognised:
        log.warning("%s: %d keys not recognised as SDXL LoRA layers (e.g. %s)",
                    source, len(unrecognised), unrecognised[0])
    if not layers:
        family = guess_family_from_keys(list(state_dict), source)
        raise LoraFormatError(
            f"{source}: no LoRA layers found ({len(state_dict)} keys"
            + (f"; it looks like {family}" if family else "") + ")")
    return LoraFile(layers, dict(metadata or {}), families, unrecognised, source)


def _adapter_kind(tensors: dict[str, torch.Tensor]) -> str | None:
    if "up" in tensors and "down" in tensors:
        return LOW_RANK
    if {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"} <= tensors.keys():
        return LOHA
    if ("lokr_w1" in tensors or {"lokr_w1_a", "lokr_w1_b"} <= tensors.keys()) and (
            "lokr_w2" in tensors or {"lokr_w2_a", "lokr_w2_b"} <= tensors.keys()):
        return LOKR
    if "diff" in tensors:
        return FULL
    return None


def _check_shapes(source: str, name: str, layer: LoraLayer) -> None:
    if layer.kind != LOW_RANK:
        return
    up, down = layer.up, layer.down
    inner = layer.mid.shape[0] if layer.mid is not None else down.shape[0]
    if up.dim() < 2 or up.shape[1] != inner or (layer.mid is not None and layer.mid.shape[1] != down.shape[0]):
        raise LoraFormatError(
            f"{source}: layer {name}: up {tuple(up.shape)} and down {tuple(down.shape)} do not "
            "chain (up's second dimension must equal down's rank)")


def check_finite(lora: LoraFile) -> None:
    bad = [name for name, layer in lora.layers.items()
           if any(not torch.isfinite(t).all() for t in layer.tensors.values())]
    if bad:
        raise LoraFormatError(
            f"{lora.source}: {len(bad)} layer(s) contain NaN or Inf values (first: {bad[0]}); "
            "the file is damaged or was saved from a diverged training run")


def read_lora(path: str | Path, check_values: bool = True) -> LoraFile:
    path = Path(path)
    tensors, metadata = load_safetensors(path)
    lora = lora_from_state_dict(tensors, metadata, source=str(path))
    if check_values:
        check_finite(lora)
    return lora


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
