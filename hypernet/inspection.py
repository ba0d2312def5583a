"""What `python -m hypernet inspect` reports about a LoRA file, as a dict (the CLI prints it; the
fuzzer reads every mutated file through it, as a user's `inspect` would)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from . import naming
from .lora import non_finite_layers, read_lora

# What inspect reads, said plainly (also printed): it scans every value of the layers it
# recognises and reports what it finds; it does not judge what the values mean.
SCANNED = ("the header (every tensor's name, dtype, shape, offsets; metadata incl. lora_adapter_metadata); "
           "every value of every recognised layer's tensors for NaN/Inf (alphas always); "
           "adapter_config.json beside an adapter_model.safetensors")
NOT_SCANNED = ("values of unrecognised keys (only counted); whether the values are a sensible LoRA "
               "(magnitudes, training quality); the base checkpoint the LoRA was trained on (guessed from shapes)")


def describe_lora(path) -> dict:
    """The facts `inspect` prints, as a dict."""
    lora = read_lora(path, check_values=False)
    blocks: Counter = Counter()
    for name in lora.layers:
        if naming.is_text_encoder(name):
            blocks[name.split(".")[0]] += 1
        else:
            blocks[naming.transformer_block_of(name) or ".".join(name.split(".")[:2])] += 1
    te_order = ("te1", "te2", "te3")
    order = sorted((b for b in blocks if b not in te_order),
                   key=lambda b: (0, naming.unet_block_order_key(b)) if naming.transformer_block_of(b + ".x") else (1, ()))
    kinds = lora.kinds()
    notes = list(lora.notes)
    for kind, label in (("loha", "LoHa"), ("lokr", "LoKr"), ("full", "full weight difference"), ("dora", "DoRA")):
        if kinds.get(kind):
            notes.append(f"{kinds[kind]} {label} layer(s): no low-rank form; expanded to a dense ΔW "
                         "when merged and written as full weight differences"
                         + (" (DoRA's magnitude vector needs the base weights and is dropped)" if kind == "dora" else ""))
    non_finite = non_finite_layers(lora)
    if non_finite:
        notes.append(f"{len(non_finite)} layer(s) contain NaN or Inf (first: {non_finite[0]}); merging refuses this file")
    return {
        "file": lora.source,
        "size_bytes": Path(lora.source).stat().st_size,
        "key_layouts": dict(lora.key_layouts),
        "base_family": lora.family,
        "base_family_name": lora.family_name,
        "family_candidates": list(lora.family_candidates),
        "evidence": lora.family_evidence,
        "layers": len(lora.layers),
        "unet_layers": len(lora.unet_layers),
        "text_encoder_layers": len(lora.text_encoder_layers),
        "layers_per_block": {b: blocks[b] for b in [*order, *te_order] if b in blocks},
        "adapter_kinds": dict(kinds),
        "ranks": dict(sorted(Counter(layer.rank for layer in lora.layers.values()).items())),
        # alpha as the file means it (kohya convention: scale = alpha / rank); "None" = found nowhere
        "alphas": {str(k): v for k, v in Counter(
            None if layer.alpha is None else round(layer.alpha, 6) for layer in lora.layers.values()).items()},
        "alpha_sources": dict(lora.alpha_sources),
        "scale_assumed_layers": len(lora.scale_assumed_layers),
        "dtypes": dict(lora.tensor_dtypes),
        "non_finite_layers": len(non_finite),
        "non_finite_examples": non_finite[:5],
        "unrecognised_keys": len(lora.unrecognised_keys),
        "unrecognised_examples": lora.unrecognised_keys[:5],
        "metadata_keys": sorted(lora.metadata)[:40],
        "notes": notes,
        "scanned": SCANNED,
        "not_scanned": NOT_SCANNED,
    }
