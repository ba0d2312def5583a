"""Write a merged LoRA as a standard kohya file: `lora_unet_<the weight's name>` and the family's
text-encoder prefixes (`lora_te_` for SD1.5/SD2, `lora_te1_`/`lora_te2_` for SDXL, …) with
`.lora_up/.lora_down/.alpha`, and `.diff` for layers that have no low-rank form — the form kohya's
trainers write for every family and ComfyUI's loader maps for every family (tests/test_families_comfy.py
checks that every merged layer maps to a model weight). Metadata: the merge's provenance, and the
family's own kohya/modelspec entries (hypernet/families/data)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from . import families
from .errors import LoraRarError
from .merged import MergedLora, rank_summary
from .safetensors_io import atomic_write, write_safetensors_streaming

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def merge_metadata(merged: MergedLora, *, hypernet_name: str = "", hypernet_sha256: str = "",
                   content_sha256: str = "", style_sha256: str = "",
                   content_name: str = "", style_name: str = "") -> dict[str, str]:
    report = merged.report
    family = families.get(merged.family or "sdxl")
    meta = {
        "lorarar.method": report.method,
        "lorarar.hypernet": hypernet_name,
        "lorarar.hypernet_sha256": hypernet_sha256,
        "lorarar.content": content_name, "lorarar.content_sha256": content_sha256,
        "lorarar.style": style_name, "lorarar.style_sha256": style_sha256,
        "lorarar.content_strength": repr(merged.content_strength),
        "lorarar.style_strength": repr(merged.style_strength),
        "lorarar.report": json.dumps(report.as_dict()),
        # LoRA.rar: what the hypernetwork contributed (per width H(0), coefficient statistics,
        # |W1·x|/|b1|, distance from the H(0) merge; a few hundred bytes)
        "lorarar.hypernet_contribution": (json.dumps(merged.contribution.as_dict(), separators=(",", ":"))
                                          if merged.contribution is not None else ""),
        # kohya's keys, so trainers' and UIs' LoRA browsers show sensible values; where ranks
        # differ per layer (r_c + r_s of different inputs) rank_summary records each.
        # said where a user of the file looks, not only inside the report's JSON
        "lorarar.dora": (f"{report.dora_magnitude_dropped} DoRA layer(s) written WITHOUT their magnitude: "
                         "an approximation of those layers" if report.dora_magnitude_dropped else ""),
        "lorarar.family": family.id,
        **family.metadata,
        **rank_summary(merged),
    }
    return {k: v for k, v in meta.items() if v != ""}


def save_merged(merged: MergedLora, path: str | Path, metadata: dict[str, str] | None = None,
                dtype: str = "fp32", force: bool = False) -> Path:
    """Stream the merged LoRA to `path` (temporary file + rename; refuses to overwrite)."""
    if dtype not in DTYPES:
        raise LoraRarError(f"dtype: expected one of {', '.join(DTYPES)}, got {dtype!r}")
    torch_dtype = DTYPES[dtype]
    entries = merged.kohya_entries(torch_dtype)
    return atomic_write(path, lambda tmp: write_safetensors_streaming(tmp, entries, metadata or {}), force)
