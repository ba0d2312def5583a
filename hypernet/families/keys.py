"""LoRA keys → (module, tensor role) → a family's canonical weight.

A key is `<prefix><module path><suffix>`. The suffix says which tensor it is (`.lora_down.weight`,
`.lora_A.weight`, `_lora.up.weight`, `.hada_w1_a`, `.alpha`, …) and is the same for every family.
The prefix says which trainer wrote it and in which naming (`KEY_FORMS`, also family-independent:
kohya's `lora_unet_` flattens the model's own names, OneTrainer's `lora_transformer_` and
SimpleTuner's `lycoris_` flatten diffusers' names, `transformer.`/`unet.` are diffusers/peft,
`diffusion_model.` is ComfyUI's, no prefix at all is diffusers' `save_attn_procs` or DiffSynth).
The module path is then read with the family's vocabularies (spec.Vocabulary), which is the only
family-specific step — so one parse serves every family, and the family is detected by which
family reads the paths best (hypernet/families/detect.py).

Names of the key layouts (what wrote a file) — called "layouts", never "families", which are base
models.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

from .spec import FamilySpec, evaluate

MAX_KEY_LENGTH = 512  # the longest real key is ~130 characters

# Key layouts, named by what writes them (reported per file).
LAYOUT_KOHYA = "kohya"  # sd-scripts, LyCORIS, musubi-tuner, most trainers and published files
LAYOUT_KOHYA_DIFFUSERS = "kohya with diffusers names"  # diffusers' kohya exporter, OneTrainer (SD)
LAYOUT_DIFFUSERS = "diffusers save_lora_weights"  # diffusers/peft training scripts, ai-toolkit, LoRA.rar's
LAYOUT_DIFFUSERS_PROCESSOR = "diffusers attention processors (diffusers <= 0.20)"
LAYOUT_PEFT_STATE_DICT = "peft state dict with adapter name"  # a raw `model.state_dict()`
LAYOUT_PEFT = "peft save_pretrained"
LAYOUT_COMFYUI = "ComfyUI"  # also ai-toolkit's ComfyUI-style exports
LAYOUT_ONETRAINER = "OneTrainer"
LAYOUT_LYCORIS = "LyCORIS (SimpleTuner)"
LAYOUT_BARE = "diffusers names without a prefix (DiffSynth, save_attn_procs)"
LAYOUT_XLABS = "XLabs"
LAYOUT_CLONEOFSIMO = "cloneofsimo lora"

# Tensor suffix → role. Longest first, matched against the end of each key.
SUFFIX_ROLES = (
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
    # XLabs' Flux LoRAs: `double_blocks.0.processor.qkv_lora1.down.weight` (checked last: generic)
    (".down.weight", "down"), (".up.weight", "up"),
)


def split_key(key: str) -> tuple[str, str] | None:
    """(module key, role), or None for a key that is no LoRA tensor."""
    for suffix, role in SUFFIX_ROLES:
        if key.endswith(suffix) and len(key) > len(suffix):
            return key[: -len(suffix)], role
    return None


@dataclass(frozen=True)
class ParsedModule:
    """What a module key says before a family reads it."""

    key: str                      # the module key (a file's key minus its tensor suffix)
    form: str                     # which KEY_FORMS entry matched
    path: str                     # the module path after the prefix (flat for flat forms)
    flat: bool                    # kohya-style: dots flattened to underscores
    vocabularies: tuple[str, ...]
    component: str = ""           # whose peft settings apply: unet, transformer, text_encoder…, peft
    encoder: str = ""             # text encoders: the kohya prefix or the diffusers component
    processor: bool = False       # diffusers <= 0.20 attention-processor key
    peft_default: bool = False    # `.default.weight` (a peft state dict with its adapter name)

    @property
    def is_text_encoder(self) -> bool:
        return bool(self.encoder)


# (form, regex on the module key, flat, vocabularies tried in order, peft component). The order
# matters: a more specific prefix first, no prefix last.
KEY_FORMS = (
    ("kohya", re.compile(r"^lora_unet_(.+)$"), True, ("model", "diffusers"), ""),
    ("onetrainer", re.compile(r"^lora_transformer_(.+)$"), True, ("diffusers", "model"), ""),
    ("lycoris", re.compile(r"^lycoris_(.+)$"), True, ("diffusers", "model"), ""),
    ("comfyui", re.compile(r"^(?:base_model\.model\.)?(?:model\.)?diffusion_model\.(.+)$"), False, ("model", "diffusers"), ""),
    ("transformer", re.compile(r"^transformer\.(.+)$"), False, ("diffusers", "model"), "transformer"),
    ("unet", re.compile(r"^(?:unet\.)+(.+)$"), False, ("diffusers",), "unet"),
    ("peft", re.compile(r"^base_model\.model\.(.+)$"), False, ("diffusers", "model"), "peft"),
    ("bare", re.compile(r"^(.+)$"), False, ("diffusers", "model", "xlabs"), ""),
)
_KOHYA_TE = re.compile(r"^(lora_te\d?_)(.+)$")
_DIFFUSERS_TE = re.compile(r"^(text_encoder(?:_\d)?)\.(.+)$")
_PEFT_TE = re.compile(r"^base_model\.model\.((?:text_model\.)?(?:encoder|embeddings)\..+)$")
_PROCESSOR_PROJECTION = re.compile(r"\.processor\.(to_(?:q|k|v|out))(?=\.|$)")
_OLD_TEXT_PROCESSOR = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj", "to_out.0": "out_proj"}


def parse_module(key: str, processor: bool = False, peft_default: bool = False) -> ParsedModule | None:
    """The prefix of a module key: which trainer's form it has and the path inside it."""
    if len(key) > MAX_KEY_LENGTH:
        return None
    if processor:
        # diffusers <= 0.20 attention processors: `…attn1.processor.to_out_lora.up.weight` is the
        # layer `…attn1.to_out.0`
        key = key.replace(".processor.", ".")
        if key.endswith(".to_out"):
            key += ".0"
    if m := _KOHYA_TE.match(key):
        return ParsedModule(key, "kohya_te", m.group(2), True, (), "", m.group(1), processor, peft_default)
    if m := _DIFFUSERS_TE.match(key):
        component, path = m.groups()
        if processor:
            head, _, proj = path.rpartition(".self_attn.")
            path = f"{head}.self_attn.{_OLD_TEXT_PROCESSOR.get(proj, proj)}" if head else path
        return ParsedModule(key, "diffusers_te", path, False, (), component, component, processor, peft_default)
    if m := _PEFT_TE.match(key):
        return ParsedModule(key, "peft_te", m.group(1), False, (), "peft", "peft", processor, peft_default)
    for form, regex, flat, vocabularies, component in KEY_FORMS:
        if m := regex.match(key):
            path = m.group(1)
            if not flat and _PROCESSOR_PROJECTION.search(path):
                # an attention processor's projection named with a peft or kohya suffix (ComfyUI maps
                # `….attn1.processor.to_out` to `….attn1.to_out.0` whatever the suffix)
                path = _PROCESSOR_PROJECTION.sub(r".\1", path)
                if path.endswith(".to_out"):
                    path += ".0"
            if form == "unet":
                # the official LoRA.rar training wrote a doubled `unet.unet.` prefix (eaten above)
                path = re.sub(r"\.processor$", "", path.replace(".processor.", "."))
            return ParsedModule(key, form, path, flat, vocabularies, component, "", processor, peft_default)
    return None


# ---------------------------------------------------------------------------------------------
# Reading a path with one family's vocabularies

@functools.lru_cache(maxsize=None)
def _word_pattern(words: tuple[str, ...]) -> re.Pattern:
    # A word counts only between underscores (or the ends); alternatives are tried longest first.
    alternatives = "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))
    return re.compile(rf"(?:(?<=_)|^)({alternatives})(?=_|$)")


@functools.lru_cache(maxsize=1 << 16)
def unflatten(flat: str, words: tuple[str, ...]) -> str:
    """`double_blocks_0_img_attn_qkv` → `double_blocks.0.img_attn.qkv`: the known multi-word tokens
    are protected, every other underscore becomes a dot (kohya's flattening is ambiguous)."""
    if not words:
        return flat.replace("_", ".")
    pieces = _word_pattern(words).split(flat)
    # split() with one group alternates: plain text, protected word, plain text, …
    return "".join(piece if i % 2 else piece.replace("_", ".") for i, piece in enumerate(pieces))


@dataclass(frozen=True)
class Canonical:
    name: str                   # canonical weight name
    parts: tuple[str, ...]      # the parts of a fused weight this module covers, in its row order
    vocabulary: str             # which vocabulary read it


def read_model_path(spec: FamilySpec, parsed: ParsedModule, rows: int | None, width: int | None) -> Canonical | None:
    """A model module's canonical weight in `spec`, or None where the family cannot read it.
    `rows`/`width`: the adapted weight's out/in features (a mapping may hold only for some rows).

    Every vocabulary's explicit mappings are tried before any path is taken as a name of the model
    itself: the families accept any name under their blocks (a LyCORIS file may adapt a norm), so
    a diffusers `layers.0.attention.to_q` under ComfyUI's `diffusion_model.` prefix must be read
    as the q rows of `attention.qkv` before it could pass for a module of that name."""
    paths = []
    for vocabulary_name in parsed.vocabularies:
        vocabulary = spec.vocabularies.get(vocabulary_name)
        if vocabulary is None:
            continue
        path = unflatten(parsed.path, vocabulary.words) if parsed.flat else parsed.path
        paths.append((vocabulary, path))
        for mapping in vocabulary.lookup(path) if vocabulary.mappings else ():
            match = mapping.regex.match(path)
            if match is None:
                continue
            if mapping.rows is not None:
                if rows is None or width is None or evaluate(mapping.rows, {"h": width}) != rows:
                    continue
            name = mapping.target.format(**match.groupdict())
            if spec.is_valid_model_name(name):
                return Canonical(name, mapping.parts, vocabulary.name)
    for vocabulary, path in paths:
        if vocabulary.identity and spec.is_valid_model_name(path):
            return Canonical(path, (), vocabulary.name)
    return None


def read_text_encoder_path(spec: FamilySpec, parsed: ParsedModule, width: int | None) -> Canonical | None:
    """A text-encoder module's canonical name (`te1.text_model.encoder.layers.0.self_attn.q_proj`)."""
    if parsed.form == "kohya_te":
        slots = [e for e in spec.encoders.values() if parsed.encoder in e.kohya]
    elif parsed.form == "diffusers_te":
        slots = [e for e in spec.encoders.values() if parsed.encoder in e.diffusers]
    else:  # peft's `base_model.model.encoder…` does not say which encoder: the width does
        slots = [e for e in spec.encoders.values() if width is not None and e.width == width]
    for encoder in slots:
        kind = spec.encoder_kinds[encoder.kind]
        path = unflatten(parsed.path, tuple(kind["words"])) if parsed.flat else parsed.path
        # transformers 5 flattened CLIPTextModel (CLIP-L): `encoder.layers.N…` sits directly on the
        # model; CLIPTextModelWithProjection (CLIP-G) still wraps it in `text_model.`. Both mean
        # the same layer.
        if path.startswith(tuple(kind["flattened_roots"])):
            path = f"text_model.{path}"
        name = f"{encoder.id}.{path}"
        if spec.is_valid_encoder_name(name):
            return Canonical(name, (), "text")
    return None


def layout_of(parsed: ParsedModule, vocabulary: str) -> str:
    """The key layout a module's key has (what wrote it), for reports."""
    if vocabulary == "xlabs":
        return LAYOUT_XLABS
    if parsed.processor:
        return LAYOUT_DIFFUSERS_PROCESSOR
    if parsed.peft_default:
        return LAYOUT_PEFT_STATE_DICT
    form = parsed.form
    if form == "kohya":
        return LAYOUT_KOHYA if vocabulary == "model" else LAYOUT_KOHYA_DIFFUSERS
    if form == "kohya_te":
        return LAYOUT_KOHYA_DIFFUSERS if parsed.path.startswith(("encoder_", "embeddings_")) else LAYOUT_KOHYA
    if form in ("peft", "peft_te"):
        return LAYOUT_PEFT
    if form == "bare":
        return LAYOUT_XLABS if vocabulary == "xlabs" else LAYOUT_BARE
    return {"comfyui": LAYOUT_COMFYUI, "onetrainer": LAYOUT_ONETRAINER, "lycoris": LAYOUT_LYCORIS}.get(form, LAYOUT_DIFFUSERS)
