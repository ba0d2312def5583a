"""Probe what a hypernetwork does with LoRAs (`lorarar probe`): the figures every LoRA.rar merge
measures about itself (methods/lorarar_diagnostics) — per width H(0), the mean and spread of the
coefficients, the share of negative ones, |W1·x| / |b1| and the distance from the H(0) merge —
for one pair of files, or for synthetic pairs over a range of magnitudes.

With a pair, the layers H merges (`to_q`/`to_out.0` of every attention module both files have)
go to H directly, whatever base model the files are for: layers of widths H has no input for are
left out and counted, so SD1.5 files show what an SDXL hypernetwork does with their 640- and
1280-wide attention layers. The merge itself still refuses such files.

Without a pair, random rank-r LoRAs on H's targets at SDXL's shapes are scaled so that the median
norm of a ΔW column is a multiple ("magnitude") of REAL_COLUMN_NORM, the size of real trained
LoRAs (docs/methods.md: column norms 1e-2 – 8e-2 at 640/1280-wide attention layers). The same random
directions at every magnitude: only the size changes, so |W1·x| / |b1| grows exactly with it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from . import naming
from .errors import HypernetError, LoraFormatError
from .lora import LOW_RANK, LoraFile, LoraLayer, check_finite, lora_from_state_dict, read_lora
from .methods.lorarar import coefficient_pass, hypernet_layers
from .methods.lorarar_diagnostics import measure_contribution
from .model import HyperNetwork
from .safetensors_io import load_safetensors, read_header
from .tooling import synthetic

REAL_COLUMN_NORM = 0.05
MAGNITUDES = (0.1, 0.3, 1.0, 3.0, 10.0, 30.0)


def hypernet_facts(hypernet: HyperNetwork) -> dict:
    """What H does before it sees any input: per width its bias size and H(0)."""
    return {
        "name": hypernet.config.name, "source": str(hypernet.source_path or ""), "hidden": hypernet.config.hidden,
        "targets": list(hypernet.config.targets),
        "widths": {str(w): {"h0": [round(v, 4) for v in hypernet.zero_input_coefficients(w)],
                            "bias_norm": round(float(hypernet.input_layer(w).bias.norm()), 4)}
                   for w in hypernet.widths},
    }


def probe_pair(hypernet: HyperNetwork, content: LoraFile, style: LoraFile) -> dict:
    """The diagnostics of H on one pair (content first), as a JSON-able dict."""
    names = hypernet_layers(content, style, hypernet)
    if not names:
        raise HypernetError(
            f"{content.source or 'content LoRA'} and {style.source or 'style LoRA'} share no layer the "
            f"hypernetwork merges ({'/'.join(hypernet.config.targets)} of an attention module, attn1/attn2): "
            f"the content LoRA has {len(content.layers)} layers, the style LoRA {len(style.layers)}")
    widths = {}
    for name in names:
        widths.setdefault(content.layers[name].shape[0], []).append(name)
    if not set(widths) & set(hypernet.widths):
        raise HypernetError(
            f"the pair's {'/'.join(hypernet.config.targets)} layers are "
            f"{'/'.join(map(str, sorted(widths)))} wide; this hypernetwork has input layers for widths "
            f"{'/'.join(map(str, hypernet.widths))} only (base family {hypernet.config.base_family}), so it "
            "reads none of them")
    passed = coefficient_pass(content, style, hypernet, unsupported_width="sum")
    contribution = measure_contribution(hypernet, passed.coefficients, passed.measures, passed.widths)
    return {
        "content": content.source, "style": style.source,
        "layers": len(passed.coefficients),
        "left_out": {str(w): len(n) for w, n in sorted(widths.items()) if w not in hypernet.widths},
        "summary": contribution.summary(), "warnings": contribution.warnings(),
        **contribution.as_dict(),
    }


# ---------------------------------------------------------------------------------------------
# Synthetic pairs over magnitudes

def synthetic_layers(hypernet: HyperNetwork) -> dict[str, tuple[int, int]]:
    """H's target layers at SDXL's shapes for the widths it has (SDXL: all 280); widths SDXL lacks
    get two square attention modules each, under names of their own."""
    targets = hypernet.config.targets
    shapes = {n: s for n, s in naming.sdxl_linear_layers().items()
              if s[0] in hypernet.widths and any(n.endswith(f".{t}") for t in targets) and ".attn" in n}
    for width in sorted(set(hypernet.widths) - {s[0] for s in shapes.values()}):
        for attention in ("attn1", "attn2"):
            for target in targets:
                shapes[f"probe_width_{width}.transformer_blocks.0.{attention}.{target}"] = (width, width)
    return shapes


def synthetic_pair(shapes: dict[str, tuple[int, int]], magnitude: float, rank: int, seed: int) -> tuple[LoraFile, LoraFile]:
    """Random rank-`rank` content and style LoRAs on `shapes` whose ΔW columns have a median norm
    of magnitude × REAL_COLUMN_NORM in every layer (the up factor carries the size)."""
    return tuple(_scaled(lora, magnitude) for lora in _unit_pair(shapes, rank, seed))


def _unit_pair(shapes: dict[str, tuple[int, int]], rank: int, seed: int) -> list[LoraFile]:
    """The pair at magnitude 1; column norms from the r×r Gram of up (no out×in product)."""
    pair = []
    for offset, role in ((0, "content"), (1, "style")):
        layers = {}
        for name, (up, down) in synthetic.random_factors(shapes, rank, seed + offset).items():
            column = float(torch.linalg.vecdot((up.T @ up) @ down, down, dim=0).sqrt().median())
            layers[name] = LoraLayer(LOW_RANK, {"up": up * (REAL_COLUMN_NORM / column), "down": down})
        pair.append(LoraFile(layers, source=f"synthetic {role}"))
    return pair


def _scaled(lora: LoraFile, magnitude: float) -> LoraFile:
    layers = {n: LoraLayer(LOW_RANK, {"up": layer.up * magnitude, "down": layer.down}) for n, layer in lora.layers.items()}
    return LoraFile(layers, source=f"{lora.source} x{magnitude:g}")


def probe_magnitudes(hypernet: HyperNetwork, magnitudes=MAGNITUDES, rank: int = 16, seed: int = 0) -> dict:
    """The diagnostics of H on synthetic pairs at each magnitude (× the size of real LoRAs)."""
    if not magnitudes or any(not m > 0 for m in magnitudes):
        raise HypernetError(f"magnitudes: expected positive numbers, got {list(magnitudes)}")
    shapes = synthetic_layers(hypernet)
    unit = _unit_pair(shapes, rank, seed)  # the same directions at every magnitude
    rows = []
    for magnitude in magnitudes:
        content, style = (_scaled(lora, magnitude) for lora in unit)
        passed = coefficient_pass(content, style, hypernet)
        contribution = measure_contribution(hypernet, passed.coefficients, passed.measures, passed.widths)
        rows.append({"magnitude": magnitude, "summary": contribution.summary(), **contribution.as_dict()})
    return {"synthetic": {"rank": rank, "seed": seed, "layers": len(shapes),
                          "column_norm_at_1": REAL_COLUMN_NORM,
                          "what": "random Gaussian factors scaled so that the median ΔW column norm is "
                                  "magnitude × column_norm_at_1 (real trained LoRAs: 1e-2 to 8e-2)"},
            "magnitudes": rows}


def table(document: dict) -> str:
    """The probe's figures as a fixed-width text table (one row per magnitude or pair and width)."""
    header = (f"{'input':<20} {'width':>5} {'|W1x|/|b1|':>10} {'H(0) m_c':>9} {'m_c mean+-sd':>13} {'neg':>5} "
              f"{'H(0) m_s':>9} {'m_s mean+-sd':>13} {'neg':>5} {'input effect':>12} {'vs H(0)':>8}")
    lines = [header, "-" * len(header)]
    rows = document.get("magnitudes") or [document]
    for row in rows:
        label = f"x{row['magnitude']:g}" if "magnitude" in row else "the pair"
        for width, f in row["widths"].items():
            lines.append(
                f"{label:<20} {width:>5} {f['input_to_bias']:>10.3f} {f['h0'][0]:>+9.2f} "
                f"{f['mean'][0]:>+7.2f}+-{f['spread'][0]:<4.2f} {f['negative'][0]:>5.0%} {f['h0'][1]:>+9.2f} "
                f"{f['mean'][1]:>+7.2f}+-{f['spread'][1]:<4.2f} {f['negative'][1]:>5.0%} "
                f"{f['input_effect']:>12.0%} {f['distance_from_h0']:>8.0%}")
            label = ""
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Reading files for the probe

_PROCESSOR_KEY = re.compile(r"^(down_blocks|up_blocks|mid_block)\.\S*\.processor\.")
_CLONEOFSIMO_KEY = re.compile(r"^unet:(\d+):(up|down)$")

# The cloneofsimo `lora` package numbers the Linear layers it wraps in the order
# `unet.modules()` visits them: per transformer block attn1 (q, k, v, out), the GEGLU projection
# when "GEGLU" is among its targets, attn2 (q, k, v, out); the blocks in diffusers' registration
# order of UNet2DConditionModel (SD1.x/2.x): down_blocks 0–2 (two each), up_blocks 1–3 (three each),
# then mid_block (assigned after up_blocks). Widths are checked against every tensor.
_SD1_BLOCKS = ([(f"down_blocks.{i}.attentions.{j}", w) for i, w in enumerate((320, 640, 1280)) for j in range(2)]
               + [(f"up_blocks.{i}.attentions.{j}", w) for i, w in ((1, 1280), (2, 640), (3, 320)) for j in range(3)]
               + [("mid_block.attentions.0", 1280)])


def read_for_probe(path: str | Path) -> LoraFile:
    """A LoRA file for the probe: whatever `read_lora` reads, and two early SD1.5-era forms it does
    not read (yet) — diffusers' `save_attn_procs` keys without the `unet.` prefix and the
    cloneofsimo `lora` package's numbered `unet:N:up` keys — translated into a form it reads.
    Only the UNet's attention layers of those two forms are kept (the probe needs nothing else)."""
    path = Path(path)
    keys = list(read_header(path)[0]) if path.is_file() else []
    processor = any(_PROCESSOR_KEY.match(k) for k in keys)
    if not processor and not any(_CLONEOFSIMO_KEY.match(k) for k in keys):
        return read_lora(path)
    tensors, metadata = load_safetensors(path)
    if processor:
        translated = {"unet." + k: v for k, v in tensors.items() if _PROCESSOR_KEY.match(k)}
        form = "diffusers attention processors without the unet. prefix"
    else:
        translated = _cloneofsimo_attention(tensors, metadata, str(path))
        form = "cloneofsimo lora package (numbered unet:N keys)"
    lora = lora_from_state_dict(translated, metadata, source=str(path))
    check_finite(lora)
    lora.notes.append(f"read for the probe as {form}: {len(lora.layers)} attention layers")
    return lora


def _cloneofsimo_attention(tensors: dict[str, torch.Tensor], metadata: dict[str, str], source: str) -> dict:
    try:
        targets = json.loads(metadata.get("unet", "[]"))
    except json.JSONDecodeError:
        targets = []
    projections = ["attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0"]
    projections += ["ff.net.0.proj"] * ("GEGLU" in targets) + ["attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0"]
    places = [(block, width, projection) for block, width in _SD1_BLOCKS for projection in projections]
    numbered = {}
    for key, tensor in tensors.items():
        match = _CLONEOFSIMO_KEY.match(key)
        if match:
            numbered.setdefault(int(match.group(1)), {})[match.group(2)] = tensor
    if max(numbered) + 1 != len(places):
        raise LoraFormatError(
            f"{source}: cloneofsimo LoRA with {max(numbered) + 1} numbered UNet modules; an SD1.x/2.x UNet with "
            f"targets {targets or 'unknown'} has {len(places)}, so its layers cannot be named")
    out = {}
    for index, (block, width, projection) in enumerate(places):
        pair = numbered.get(index, {})
        if set(pair) != {"up", "down"}:
            raise LoraFormatError(f"{source}: unet:{index} lacks its up or down tensor")
        if pair["up"].shape[0] != (width * 8 if projection.startswith("ff") else width):
            raise LoraFormatError(
                f"{source}: unet:{index} is {pair['up'].shape[0]} wide where the SD1.x/2.x module order puts "
                f"{block}.{projection} ({width} wide); the file's module order is not the one expected")
        if projection.endswith(("to_q", "to_out.0")):
            prefix = f"unet.{block}.transformer_blocks.0.{projection}.lora"
            out[f"{prefix}.up.weight"], out[f"{prefix}.down.weight"] = pair["up"], pair["down"]
    return out
