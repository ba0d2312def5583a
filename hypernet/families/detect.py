"""Which family a LoRA is for, from its keys and the shapes of its factors — never its file name.

Every family reads every module path it can (keys.read_model_path / read_text_encoder_path); the
family that reads the file best wins, by, in this order:

1. how many layers it reads as weights its models have, at a shape the family gives them: exactly
   a published size's (SD1.5's 768-wide cross-attention context against SDXL's 2048), or the
   family's proportions with the width read off the layer itself (Flux.1's linear1 is 7× its input,
   Flux.2's 9× — this works for tiny test models too);
2. how many layers it reads as weights its models have at all (the golden tables: SDXL has
   `transformer_blocks.9`, SD1.5 has not; a Flux file's `img_mod.lin` exists in Flux.1 only);
3. how many layers have exactly the shape of the family's best-fitting published size;
4. how many keys it reads at all.

Families still equal after that are all *candidates*; the first in registry order is chosen, and
a merge settles the rest with the other input, the hypernetwork or the model (hypernet/merge.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from . import all_families
from . import get as _get_family
from .keys import Canonical, ParsedModule, read_model_path, read_text_encoder_path
from .spec import FamilySpec


@dataclass(frozen=True)
class Module:
    """One module of a file as detection sees it: its parsed key and the adapted weight's shape
    as the factors give it (None where the factors do not tell)."""

    parsed: ParsedModule
    shape: tuple[int, ...] | None


@dataclass
class Match:
    family: str | None                       # the chosen family, None if no family reads the file
    candidates: tuple[str, ...] = ()         # families that read it equally well (chosen first)
    scores: dict[str, tuple] = field(default_factory=dict)
    evidence: str = ""


def read_module(spec: FamilySpec, module: Module) -> Canonical | None:
    shape = module.shape
    rows = shape[0] if shape else None
    width = shape[1] if shape and len(shape) > 1 else None
    if module.parsed.is_text_encoder:
        # peft's wrapped CLIP says its width only through its layers: every layer of a CLIP has the
        # model width on one side (q/k/v/out both, fc1 its input, fc2 its output)
        return read_text_encoder_path(spec, module.parsed, min(rows, width) if shape and width else None)
    return read_model_path(spec, module.parsed, rows, width)


def _score(spec: FamilySpec, modules: Sequence[Module]) -> tuple[int, int, int, int]:
    """(layers that are weights of the model at a shape it gives them, layers that are weights of
    the model, the best published size's exact fits, keys read at all)."""
    read = in_table = fits = 0
    absolute = {v.id: 0 for v in spec.variants}
    tables = {v.id: spec.table(v.id) for v in spec.variants}
    for module in modules:
        canonical = read_module(spec, module)
        if canonical is None:
            continue
        read += 1
        name, shape = canonical.name, module.shape
        encoder = spec.encoder_of(name)
        if encoder is not None:
            table = spec.encoder_table(encoder)
            if name in table:
                in_table += 1
                if shape is not None and _flat(shape) == _flat(table[name]):
                    fits += 1
                    for variant in absolute:
                        absolute[variant] += 1
            continue
        if name not in spec.all_names():
            continue
        in_table += 1
        if shape is None:
            continue
        if canonical.parts:
            # a slice of a fused weight: its rows must be those parts' rows at its own width
            rows = spec.part_rows(name, canonical.parts, shape[1]) if len(shape) > 1 else None
            relative = rows is not None and len(rows) == shape[0]
            exact = [v for v, table in tables.items() if relative and name in table and table[name][1:] == tuple(shape[1:])]
        else:
            relative = spec.relative_fit(name, shape)
            exact = [v for v, table in tables.items() if name in table and _flat(table[name]) == _flat(shape)]
        fits += bool(relative or exact)
        for variant in exact:
            absolute[variant] += 1
    return fits, in_table, max(absolute.values(), default=0), read


def _flat(shape: Sequence[int]) -> tuple[int, int]:
    """A shape as out × in·k·k (a conv LoHa or LoKr is stored flat)."""
    rest = 1
    for size in shape[1:]:
        rest *= size
    return (shape[0], rest)


SAMPLE = 64


def detect(modules: Sequence[Module], only: Sequence[str] | None = None) -> Match:
    """The family that reads `modules` best (see the module docstring); `only` limits the choice.

    Families that read none of an even sample of the modules, where another reads some, are not
    scored on all of them (a family that reads none of 64 evenly spaced layers cannot read more of
    the file than one that reads them): an SDXL file is scored by the three UNet families only."""
    specs = [spec for spec in all_families() if only is None or spec.id in only]
    if len(modules) > SAMPLE:
        step = len(modules) / SAMPLE
        sample = [modules[int(i * step)] for i in range(SAMPLE)]
        reads = {spec.id: _score(spec, sample)[1] for spec in specs}
        if max(reads.values()) > 0:
            specs = [spec for spec in specs if reads[spec.id] > 0]
    scores = {}
    for spec in specs:
        score = _score(spec, modules)
        if score[3]:
            scores[spec.id] = score
    if not scores:
        return Match(None, (), scores, "no family reads its keys")
    best = max(scores.values())
    candidates = tuple(f for f, s in scores.items() if s == best)
    fits, in_table, absolute, read = best
    widths = _attention_widths(_get_family(candidates[0]), modules)
    evidence = ((f"{'/'.join(map(str, widths))}-wide attention; " if widths else "")
                + f"{in_table} of {len(modules)} layers are weights of the model"
                + (f", {absolute} at the exact shape of a published size" if absolute else "")
                + (f", {fits} at its proportions" if fits and not absolute else ""))
    return Match(candidates[0], candidates, scores, evidence)


def _attention_widths(spec: FamilySpec, modules: Sequence[Module]) -> list[int]:
    """The widths (inputs) of the attention layers a file adapts — what a user knows a model by."""
    widths = set()
    for module in modules:
        if module.shape is None or module.parsed.is_text_encoder:
            continue
        canonical = read_module(spec, module)
        if canonical is not None and spec.attention_of(canonical.name) and "q" in spec.roles_of(canonical.name):
            widths.add(module.shape[1])
    return sorted(widths)
