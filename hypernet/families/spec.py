"""A model family as data: what its weights are called and how large they are, how its trainers
name them, what each weight is for, and how a merged LoRA for it is written.

A family is one JSON file in `data/` (the UNet families describe their UNet by its parameters and
get their layers from `unet.py`). This module turns such a file into a `FamilySpec`; the reader
(hypernet/lora.py), the methods, the writer and the ComfyUI glue ask the spec, never the family's
name.

Canonical layer names are the names of the model's own weights as ComfyUI holds them inside
`diffusion_model` (the LDM names for the UNets, BFL's for Flux, `joint_blocks` for SD3, …) and
`te<N>.` + the text encoder's module path. One name is one weight. Where the model fuses several
projections into one weight (Flux's `img_attn.qkv`, its single blocks' `linear1` = q, k, v and the
MLP input), the weight lists its *parts* in row order; a LoRA that a trainer wrote for one part
(diffusers' `to_q`) is a block-sparse LoRA of the whole weight (hypernet/lora.py places it).

Shapes and part lengths are written as small expressions over the variant's dimensions: `h`,
`3h`, `ffn`, `depth-1`, 256 — a coefficient, a name, an optional ±offset; never evaluated as code.
"""

from __future__ import annotations

import functools
import json
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

DATA = Path(__file__).with_name("data")

_EXPRESSION = re.compile(r"^(\d*)([A-Za-z_]\w*)?([+-]\d+)?$")


class SpecError(ValueError):
    """A family data file that does not describe a family (a bug in the pack, not user input)."""


def evaluate(expression, dims: dict[str, int]) -> int:
    """`3h` with h = 3072 → 9216; ints pass through. Unknown names raise KeyError."""
    if isinstance(expression, int):
        return expression
    match = _EXPRESSION.match(str(expression))
    if match is None or not (match.group(1) or match.group(2)):
        raise SpecError(f"bad size expression {expression!r}")
    coefficient, name, offset = match.groups()
    value = dims[name] if name else 1
    if coefficient:
        value = int(coefficient) * value if name else int(coefficient)
    return value + (int(offset) if offset else 0)


_NUMBER = re.compile(r"(?<=\.)\d+(?=\.|$)|^\d+(?=\.|$)")


def _shape_key(path: str) -> str:
    """`transformer_blocks.3.ff.net.0.proj` → `transformer_blocks.#.ff.net.#.proj`."""
    return _NUMBER.sub("#", path)


def _template_regex(template: str) -> re.Pattern:
    """`double_blocks.{i}.img_attn.qkv` → a regex capturing i (any `{name}` is a number)."""
    pieces = re.split(r"\{(\w+)\}", template)
    pattern = "".join(re.escape(p) if k % 2 == 0 else rf"(?P<{p}>\d+)" for k, p in enumerate(pieces))
    return re.compile(f"^{pattern}$")


@dataclass(frozen=True)
class Part:
    name: str
    length: str      # expression over the weight's dims (for fused weights, multiples of `h`)


@dataclass(frozen=True)
class WeightTemplate:
    name: str                           # "double_blocks.{i}.img_attn.qkv"
    shape: tuple                        # expressions
    range: tuple | None = None          # ("i", start, stop) expressions over the variant's counts
    role: str | None = None             # q, k, v, out, mlp_in, mlp_out, mod, proj, embed, conv
    parts: tuple[Part, ...] = ()        # a fused weight's parts in row order (their names are roles)
    attention: str | None = None        # which attention the weight belongs to (image, text, self, cross, …)
    only: tuple[str, ...] = ()          # variant ids that have it; empty = every variant

    @functools.cached_property
    def regex(self) -> re.Pattern:
        return _template_regex(self.name)

    @property
    def roles(self) -> frozenset[str]:
        return frozenset(p.name for p in self.parts) if self.parts else frozenset({self.role} - {None})


@dataclass(frozen=True)
class NameMapping:
    """One key-vocabulary entry: a module path template → the canonical weight and the parts it
    covers (in the order of its own rows), optionally only when its rows number `rows`."""

    regex: re.Pattern
    target: str
    parts: tuple[str, ...] = ()
    rows: str | None = None


@dataclass(frozen=True)
class Vocabulary:
    """How one naming of the model's modules (the model's own names, diffusers', XLabs') is read:
    `words` protect multi-word tokens when a kohya-style flat key is unflattened; `mappings` turn a
    module path into a canonical weight (no mappings and `identity`: the path is the name)."""

    name: str
    words: tuple[str, ...]
    mappings: tuple[NameMapping, ...] = ()
    identity: bool = False

    @functools.cached_property
    def _index(self) -> dict[str, list[NameMapping]]:
        """Mappings by what a path must look like to match them, so that reading a path is a few
        dict lookups: a template with numbered slots by its numberless form, a fixed name by
        itself, a block-prefix mapping (the UNet's `down_blocks.1.attentions.0.{rest}`) by its
        prefix."""
        index: dict[str, list[NameMapping]] = {}
        for mapping in self.mappings:
            pattern = mapping.regex.pattern.strip("^$")
            if "(?P<rest>" in pattern:
                key = "prefix:" + pattern.split(r"\.(?P<rest>", 1)[0].replace("\\", "")
            elif "(?P<" in pattern:
                key = "shape:" + _shape_key(re.sub(r"\(\?P<\w+>\\d\+\)", "0", pattern).replace("\\", ""))
            else:
                key = "exact:" + pattern.replace("\\", "")
            index.setdefault(key, []).append(mapping)
        return index

    def lookup(self, path: str) -> list[NameMapping]:
        """The mappings that may match `path` (each still to be matched)."""
        index = self._index
        found = index.get("exact:" + path, []) + index.get("shape:" + _shape_key(path), [])
        parts = path.split(".")
        for cut in range(len(parts) - 1, 0, -1):
            found = found + index.get("prefix:" + ".".join(parts[:cut]), [])
        return found


@dataclass(frozen=True)
class Variant:
    id: str
    name: str
    dims: dict
    counts: dict
    published_parameters: float | None = None
    published: str = ""


@dataclass(frozen=True)
class EncoderSpec:
    """A text encoder slot of a family: canonical prefix `te<N>.`, its architecture, and the key
    prefixes its trainers use."""

    id: str                      # "te1"
    arch: str                    # "clip_l"
    name: str                    # "CLIP-L"
    kind: str                    # "clip", "t5"
    dims: dict
    layers: int
    kohya: tuple[str, ...]       # "lora_te1_", …
    diffusers: tuple[str, ...]   # "text_encoder", …
    writer: str                  # the kohya prefix a merged file uses

    @property
    def width(self) -> int:
        return self.dims["w"]


@dataclass(frozen=True)
class SwitchRule:
    """K-LoRA: which weights switch (by template or regex), and which of their parts (rows)."""

    templates: tuple[str, ...] = ()
    regex: re.Pattern | None = None
    parts: tuple[str, ...] = ()


@dataclass
class FamilySpec:
    id: str
    name: str
    covers: str
    architecture: str                       # "unet" or "dit"
    variants: tuple[Variant, ...]
    weights: tuple[WeightTemplate, ...]
    roots: tuple[re.Pattern, ...]
    vocabularies: dict[str, Vocabulary]
    encoders: dict[str, EncoderSpec]
    encoder_kinds: dict[str, dict]
    switch_rules: tuple[SwitchRule, ...]
    k_lora_why: str
    blocks: tuple[re.Pattern, ...]
    block_labels: tuple[str, ...]
    writer: dict[str, str]
    metadata: dict[str, str]
    max_layer_elements: int
    max_dense_elements: int
    hypernet_families: tuple[str, ...]
    comfy_model_configs: tuple[str, ...]
    unet: dict | None = None
    order: int = 0
    _cache: dict = field(default_factory=dict, repr=False)

    # -- the layer table ------------------------------------------------------------------------

    def variant(self, variant_id: str) -> Variant:
        for variant in self.variants:
            if variant.id == variant_id:
                return variant
        raise KeyError(f"{self.id} has no variant {variant_id!r}")

    def table(self, variant_id: str | None = None) -> dict[str, tuple[int, ...]]:
        """Every weight (ndim ≥ 2) of the variant's diffusion model: canonical name → shape."""
        variant = self.variant(variant_id or self.variants[0].id)
        key = ("table", variant.id)
        if key not in self._cache:
            dims = {**variant.dims, **variant.counts}
            out: dict[str, tuple[int, ...]] = {}
            for weight in self.weights:
                if weight.only and variant.id not in weight.only:
                    continue
                shape = tuple(evaluate(e, dims) for e in weight.shape)
                if weight.range is None:
                    out[weight.name] = shape
                    continue
                var, start, stop = weight.range
                for index in range(evaluate(start, dims), evaluate(stop, dims)):
                    out[weight.name.replace("{" + var + "}", str(index))] = shape
            self._cache[key] = out
        return self._cache[key]

    def all_names(self) -> frozenset[str]:
        """The names of every variant's weights (what 'the family has this weight' means)."""
        if "all_names" not in self._cache:
            self._cache["all_names"] = frozenset(n for v in self.variants for n in self.table(v.id))
        return self._cache["all_names"]

    def largest_weight(self) -> int:
        """Elements of the family's largest weight (any published size): what its limits are set by."""
        return max(math.prod(shape) for v in self.variants for shape in self.table(v.id).values())

    def largest_model(self) -> int:
        """Elements of the weights of the family's largest published size."""
        return max(sum(math.prod(shape) for shape in self.table(v.id).values()) for v in self.variants)

    def template_of(self, name: str) -> WeightTemplate | None:
        """The weight template a canonical model-layer name is an instance of (None for a name the
        family allows but does not list, e.g. a norm a LyCORIS file adapts)."""
        cache = self._cache.setdefault("template_of", {})
        if name not in cache:
            cache[name] = None
            for weight in self.weights:
                if weight.regex.match(name):
                    cache[name] = weight
                    break
        return cache[name]

    def templates_of(self, name: str) -> list[WeightTemplate]:
        """Every template of a name (SD3's last context block has its own adaLN shape)."""
        cache = self._cache.setdefault("templates_of", {})
        if name not in cache:
            cache[name] = [w for w in self.weights if w.regex.match(name)]
        return cache[name]

    def relative_fit(self, name: str, shape: tuple[int, ...]) -> bool:
        """Whether a weight's shape fits its template with `h` read off its own input width — a
        test of proportions that holds for any size of the family (tiny test models included).
        Templates with other dimensions (a feed-forward width) say nothing here."""
        if len(shape) < 2 or self.unet is not None:  # the UNets' sizes are not proportions of one width
            return False
        for weight in self.templates_of(name):
            in_expr = weight.shape[1]
            match = _EXPRESSION.match(str(in_expr))
            if not match or match.group(2) != "h" or len(weight.shape) != 2:
                continue
            coefficient = int(match.group(1) or 1)
            if shape[1] % coefficient:
                continue
            dims = {"h": shape[1] // coefficient}
            try:
                if evaluate(weight.shape[0], dims) == shape[0]:
                    return True
            except KeyError:
                continue
        return False

    # -- parts of fused weights -----------------------------------------------------------------

    def parts_of(self, name: str) -> tuple[Part, ...]:
        """A fused weight's parts in row order (of the first of its templates that has parts: SD3's
        last context block adaLN is (shift, scale) where the other blocks' is one 6h modulation)."""
        return next((w.parts for w in self.templates_of(name) if w.parts), ())

    def part_rows(self, name: str, parts: Iterable[str], width: int) -> list[int] | None:
        """The rows of the weight `name` that `parts` cover, in the parts' order, with `h` = the
        weight's input width; None where the weight has no such parts."""
        layout = self.parts_of(name)
        if not layout:
            return None
        starts, start = {}, 0
        dims = {"h": width}
        try:
            for part in layout:
                length = evaluate(part.length, dims)
                starts[part.name] = (start, length)
                start += length
        except KeyError:
            return None
        rows: list[int] = []
        for part in parts:
            if part not in starts:
                return None
            first, length = starts[part]
            rows.extend(range(first, first + length))
        return rows

    def fused_rows(self, name: str, width: int) -> int | None:
        """Rows of a fused weight with input width `width` (the sum of its parts)."""
        rows = self.part_rows(name, [p.name for p in self.parts_of(name)], width)
        return len(rows) if rows else None

    # -- names ----------------------------------------------------------------------------------

    def is_valid_model_name(self, name: str) -> bool:
        return name in self.all_names() or any(r.search(name) for r in self.roots)

    def encoder_of(self, name: str) -> EncoderSpec | None:
        head = name.split(".", 1)[0]
        return self.encoders.get(head)

    def is_valid_encoder_name(self, name: str) -> bool:
        encoder = self.encoder_of(name)
        if encoder is None:
            return False
        rest = name.split(".", 1)[1] if "." in name else ""
        return any(re.search(r, rest) for r in self.encoder_kinds[encoder.kind]["roots"])

    def encoder_table(self, encoder: EncoderSpec) -> dict[str, tuple[int, ...]]:
        key = ("encoder", encoder.id)
        if key not in self._cache:
            out = {}
            for weight in self.encoder_kinds[encoder.kind]["weights"]:
                for index in range(encoder.layers):
                    name = f"{encoder.id}." + weight["name"].replace("{i}", str(index))
                    out[name] = tuple(evaluate(e, encoder.dims) for e in weight["shape"])
            self._cache[key] = out
        return self._cache[key]

    def roles_of(self, name: str) -> frozenset[str]:
        """What a weight does (q, k, v, out, mlp_in, …); a fused weight has its parts' roles."""
        encoder = self.encoder_of(name)
        if encoder is not None:
            rest = name.split(".", 1)[1]
            for weight in self.encoder_kinds[encoder.kind]["weights"]:
                if _template_regex(weight["name"]).match(rest):
                    return frozenset({weight["role"]})
            return frozenset()
        if self.unet is not None:  # by name: any UNet with these module names, whatever its size
            from .unet import attention_role

            found = attention_role(name)
            if found is not None:
                return frozenset({found[0]})
        weight = self.template_of(name)
        return weight.roles if weight is not None else frozenset()

    def attention_of(self, name: str) -> str | None:
        """Which attention a weight belongs to (self, cross, image, text, joint, …), or None."""
        if self.unet is not None:
            from .unet import attention_role

            found = attention_role(name)
            return found[1] if found else None
        weight = self.template_of(name)
        return weight.attention if weight is not None else None

    # -- methods' lookups -------------------------------------------------------------------------

    def switched_rows(self, name: str, shape: tuple[int, ...]) -> tuple[int, int] | None | bool:
        """K-LoRA: False if the weight does not switch; True if all of it switches; (start, stop)
        rows if only some parts do (Flux's single-block linear1: q, k, v but not the MLP input)."""
        for rule in self.switch_rules:
            matched = (rule.regex is not None and rule.regex.search(name)) or any(
                _template_regex(t).match(name) for t in rule.templates)
            if not matched:
                continue
            if not rule.parts:
                return True
            rows = self.part_rows(name, rule.parts, shape[1] if len(shape) > 1 else 0)
            if not rows:
                return True
            if rows != list(range(rows[0], rows[-1] + 1)):
                raise SpecError(f"{self.id}: K-LoRA parts {rule.parts} of {name} are not contiguous")
            return (rows[0], rows[-1] + 1) if len(rows) < shape[0] else True
        return False

    def block_of(self, name: str) -> tuple[tuple, str] | None:
        """(sort key, block name) of the transformer block a layer belongs to, for plots."""
        if self.unet is not None:
            from .unet import block_of as unet_block_of

            return unet_block_of(name)
        for group, regex in enumerate(self.blocks):
            match = regex.search(name)
            if match:
                block = match.group(1)
                return (group, int(block.rsplit(".", 1)[1])), block
        return None

    def block_label(self, block: str) -> str | None:
        """A short label for a block in plots (`double 3`); None for a block of another family."""
        if self.unet is not None:
            kind, _, rest = block.partition(".")
            index = rest.split(".")[0]
            return {"input_blocks": f"in {index}", "middle_block": "mid", "output_blocks": f"out {index}"}.get(kind)
        for regex, label in zip(self.blocks, self.block_labels):
            match = regex.search(block + ".")
            if match and match.group(1) == block:
                return f"{label} {block.rsplit('.', 1)[1]}"
        return None

    # -- writing ------------------------------------------------------------------------------------

    def kohya_key(self, name: str) -> str:
        """The key (without `.lora_up.weight`) a merged file uses for a canonical name: kohya's
        `lora_unet_` + the flattened name, `lora_te<N>_` (or the family's own prefix) for text
        encoders — forms ComfyUI's loader maps for every family."""
        encoder = self.encoder_of(name)
        if encoder is not None:
            return encoder.writer + name.split(".", 1)[1].replace(".", "_")
        return self.writer.get("model", "lora_unet_") + name.replace(".", "_")


# ---------------------------------------------------------------------------------------------
# Loading


def _read(name: str) -> dict:
    return json.loads((DATA / f"{name}.json").read_text(encoding="utf-8"))


def _mappings(table: dict) -> tuple[NameMapping, ...]:
    out = []
    for template, target in table.items():
        options = target if isinstance(target, list) and target and isinstance(target[0], dict) else [target]
        for option in options:
            if isinstance(option, str):
                out.append(NameMapping(_template_regex(template), option))
            elif isinstance(option, list):
                out.append(NameMapping(_template_regex(template), option[0], tuple(option[1])))
            else:
                out.append(NameMapping(_template_regex(template), option["target"], tuple(option.get("parts", ())),
                                       option.get("rows")))
    return tuple(out)


def load(family_id: str, order: int = 0) -> FamilySpec:
    data = _read(family_id)
    encoders_data = _read("encoders")
    kinds = encoders_data["kinds"]
    encoders = {}
    writer = dict(data.get("writer", {}))
    for slot, entry in data.get("text_encoders", {}).items():
        arch = encoders_data["encoders"][entry["arch"]]
        encoders[slot] = EncoderSpec(slot, entry["arch"], arch["name"], arch["kind"], dict(arch["dims"]), arch["layers"],
                                     tuple(entry["kohya"]), tuple(entry["diffusers"]),
                                     writer.get(slot, f"lora_{slot}_"))
    unet = data.get("unet")
    if unet is not None:
        from . import unet as unet_layout

        weights = unet_layout.weight_templates(unet)
        variants = tuple(Variant(v["id"], v["name"], {}, {}, v.get("published_parameters"), v.get("published", ""))
                         for v in data["variants"])
        vocabularies = unet_layout.vocabularies(unet)
        roots = unet_layout.ROOTS
        blocks, block_labels = (), ()
    else:
        weights = tuple(
            WeightTemplate(w["name"], tuple(w["shape"]), tuple(w["range"]) if "range" in w else None, w.get("role"),
                           tuple(Part(p, length) for p, length in w.get("parts", ())), w.get("attention"),
                           tuple(w.get("only", ())))
            for w in data["weights"])
        variants = tuple(Variant(v["id"], v["name"], dict(v.get("dims", {})), dict(v.get("counts", {})),
                                 v.get("published_parameters"), v.get("published", "")) for v in data["variants"])
        vocabularies = {}
        for vocab_name, entry in data.get("names", {}).items():
            vocabularies[vocab_name] = Vocabulary(vocab_name, tuple(entry.get("words", ())),
                                                  _mappings(entry.get("map", {})), identity=vocab_name == "model")
        roots = tuple(re.compile(r) for r in data.get("roots", ()))
        blocks = tuple(re.compile(b["regex"]) for b in data.get("blocks", ()))
        block_labels = tuple(b.get("label", "") for b in data.get("blocks", ()))
    rules = []
    for rule in data["k_lora"]["switch"]:
        rules.append(SwitchRule(tuple(rule.get("weights", ())), re.compile(rule["regex"]) if "regex" in rule else None,
                                tuple(rule.get("parts", ()))))
    limits = data.get("limits", {})
    return FamilySpec(
        id=data["id"], name=data["name"], covers=data.get("covers", ""), architecture=data["architecture"],
        variants=variants, weights=weights, roots=roots, vocabularies=vocabularies, encoders=encoders,
        encoder_kinds=kinds, switch_rules=tuple(rules), k_lora_why=data["k_lora"].get("why", ""), blocks=blocks,
        block_labels=block_labels,
        writer=writer, metadata=dict(data.get("metadata", {})),
        max_layer_elements=int(limits.get("max_layer_elements", 1 << 26)),
        max_dense_elements=int(limits.get("max_dense_elements", 1 << 32)),
        hypernet_families=tuple(data.get("hypernet_families", (data["id"],))),
        comfy_model_configs=tuple(data.get("comfy_model_configs", ())), unet=unet, order=order)
