"""The UNet families (SD1.x, SD2.x, SDXL) from their UNet parameters: one layout, many sizes.

A UNet family's data file gives `model_channels`, `channel_mult`, `num_res_blocks`, the transformer
depth per level, the context width, whether proj_in/out are Linear (SD2, SDXL) or 1×1 convs (SD1),
and the ADM input. From those this module builds

- every weight of the LDM UNet as ComfyUI holds it (`input_blocks.N.M…`, the canonical names), in
  the order kohya lists the transformer layers, and
- the diffusers names of the same modules (`down_blocks.L.attentions.R…`) as explicit mappings.

Input block N counts the UNet's blocks from `input_blocks.0` (conv_in): each level adds
`num_res_blocks` ResBlocks (with a transformer after each where the level has attention) and, except
the last level, one downsampler; output blocks mirror them with one extra ResBlock per level, and
the upsampler sits after the level's last output block's transformer (`….2.conv`) or ResBlock
(`….1.conv`) — which is why SDXL's up_blocks.0 upsampler is `output_blocks.2.2.conv` and SD1.5's
`output_blocks.2.1.conv`.
"""

from __future__ import annotations

import re

from .spec import NameMapping, Vocabulary, WeightTemplate

LDM_WORDS = (
    "transformer_blocks", "input_blocks", "output_blocks", "middle_block", "skip_connection",
    "emb_layers", "in_layers", "out_layers", "time_embed", "label_emb", "proj_in", "proj_out",
    "to_out", "to_q", "to_k", "to_v",
)
DIFFUSERS_WORDS = (
    "transformer_blocks", "down_blocks", "up_blocks", "mid_block", "downsamplers", "upsamplers",
    "conv_shortcut", "time_emb_proj", "time_embedding", "add_embedding", "class_embedding", "conv_in", "conv_out",
    "conv_norm_out", "linear_1", "linear_2", "proj_in", "proj_out", "to_out", "to_q", "to_k", "to_v",
)
ROOTS = (re.compile(r"^(input_blocks\.\d+\.\d+|middle_block\.\d+|output_blocks\.\d+\.\d+|time_embed\.\d+|"
                    r"label_emb\.0\.\d+|out\.\d+)(\.|$)"),)
_RESNET_LAYERS = {"conv1": "in_layers.2", "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1",
                  "conv_shortcut": "skip_connection"}
_ATTENTION = {"to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "out"}


def _levels(unet: dict):
    return list(enumerate(unet["channel_mult"]))


def _blocks(unet: dict):
    """(ldm prefix, diffusers prefix, kind, in channels, out channels, transformer depth) of every
    block, in UNet order; kind is resnet / attention / downsample / upsample / fixed."""
    mc, nrb, depths = unet["model_channels"], unet["num_res_blocks"], unet["transformer_depth"]
    last = len(unet["channel_mult"]) - 1
    out = []
    chans, ch, n = [mc], mc, 1
    for level, mult in _levels(unet):
        for r in range(nrb):
            width = mc * mult
            out.append((f"input_blocks.{n}.0", f"down_blocks.{level}.resnets.{r}", "resnet", ch, width, 0))
            ch = width
            if depths[level]:
                out.append((f"input_blocks.{n}.1", f"down_blocks.{level}.attentions.{r}", "attention", ch, ch, depths[level]))
            chans.append(ch)
            n += 1
        if level != last:
            out.append((f"input_blocks.{n}.0.op", f"down_blocks.{level}.downsamplers.0.conv", "downsample", ch, ch, 0))
            chans.append(ch)
            n += 1
    out.append(("middle_block.0", "mid_block.resnets.0", "resnet", ch, ch, 0))
    out.append(("middle_block.1", "mid_block.attentions.0", "attention", ch, ch, unet["transformer_depth_middle"]))
    out.append(("middle_block.2", "mid_block.resnets.1", "resnet", ch, ch, 0))
    n = 0
    for up, (level, mult) in enumerate(reversed(_levels(unet))):
        for r in range(nrb + 1):
            width = mc * mult
            out.append((f"output_blocks.{n}.0", f"up_blocks.{up}.resnets.{r}", "resnet", ch + chans.pop(), width, 0))
            ch = width
            index = 1
            if depths[level]:
                out.append((f"output_blocks.{n}.1", f"up_blocks.{up}.attentions.{r}", "attention", ch, ch, depths[level]))
                index = 2
            if level and r == nrb:
                out.append((f"output_blocks.{n}.{index}.conv", f"up_blocks.{up}.upsamplers.0.conv", "upsample", ch, ch, 0))
            n += 1
    return out


def weight_templates(unet: dict) -> tuple[WeightTemplate, ...]:
    """Every weight (ndim ≥ 2) of the LDM UNet, named as ComfyUI names them."""
    mc, ctx = unet["model_channels"], unet["context_dim"]
    emb = 4 * mc
    weights: list[WeightTemplate] = []

    def add(name, shape, role, attention=None):
        weights.append(WeightTemplate(name, tuple(shape), None, role, (), attention))

    add("time_embed.0", (emb, mc), "embed")
    add("time_embed.2", (emb, emb), "embed")
    if unet.get("adm_in_channels"):
        add("label_emb.0.0", (emb, unet["adm_in_channels"]), "embed")
        add("label_emb.0.2", (emb, emb), "embed")
    add("input_blocks.0.0", (mc, unet["in_channels"], 3, 3), "conv")
    linear = unet["use_linear_in_transformer"]
    for ldm, _, kind, cin, cout, depth in _blocks(unet):
        if kind == "resnet":
            add(f"{ldm}.in_layers.2", (cout, cin, 3, 3), "conv")
            add(f"{ldm}.emb_layers.1", (cout, emb), "mod")
            add(f"{ldm}.out_layers.3", (cout, cout, 3, 3), "conv")
            if cin != cout:
                add(f"{ldm}.skip_connection", (cout, cin, 1, 1), "conv")
        elif kind in ("downsample", "upsample"):
            add(ldm, (cout, cin, 3, 3), "conv")
        else:
            proj = (cout, cout) if linear else (cout, cout, 1, 1)
            add(f"{ldm}.proj_in", proj, "proj")
            for d in range(depth):
                prefix = f"{ldm}.transformer_blocks.{d}"
                for attn in ("attn1", "attn2"):
                    for proj_name, role in _ATTENTION.items():
                        wide = attn == "attn2" and proj_name in ("to_k", "to_v")
                        add(f"{prefix}.{attn}.{proj_name}", (cout, ctx if wide else cout), role,
                            "self" if attn == "attn1" else "cross")
                add(f"{prefix}.ff.net.0.proj", (8 * cout, cout), "mlp_in")  # GEGLU: 2 × 4·width
                add(f"{prefix}.ff.net.2", (cout, 4 * cout), "mlp_out")
            add(f"{ldm}.proj_out", proj, "proj")
    add("out.2", (unet["out_channels"], mc, 3, 3), "conv")
    return tuple(weights)


def prefix_pairs(unet: dict) -> list[tuple[str, str, str]]:
    """(ldm prefix, diffusers prefix, kind) of every block, plus the fixed layers."""
    pairs = [(ldm, diffusers, kind) for ldm, diffusers, kind, *_ in _blocks(unet)]
    pairs += [("input_blocks.0.0", "conv_in", "fixed"), ("out.2", "conv_out", "fixed"),
              ("time_embed.0", "time_embedding.linear_1", "fixed"), ("time_embed.2", "time_embedding.linear_2", "fixed")]
    if unet.get("adm_in_channels"):  # SDXL's ADM embedding; diffusers has called it both
        pairs += [("label_emb.0.0", "add_embedding.linear_1", "fixed"), ("label_emb.0.2", "add_embedding.linear_2", "fixed"),
                  ("label_emb.0.0", "class_embedding.linear_1", "fixed"), ("label_emb.0.2", "class_embedding.linear_2", "fixed")]
    return pairs


def vocabularies(unet: dict) -> dict[str, Vocabulary]:
    mappings = []
    for ldm, diffusers, kind in prefix_pairs(unet):
        if kind == "attention":
            mappings.append(NameMapping(re.compile(rf"^{re.escape(diffusers)}\.(?P<rest>.+)$"), ldm + ".{rest}"))
        elif kind == "resnet":
            for ours, theirs in _RESNET_LAYERS.items():
                mappings.append(NameMapping(re.compile(rf"^{re.escape(diffusers)}\.{re.escape(ours)}$"), f"{ldm}.{theirs}"))
        else:
            mappings.append(NameMapping(re.compile(rf"^{re.escape(diffusers)}$"), ldm))
    return {"model": Vocabulary("model", LDM_WORDS, (), identity=True),
            "diffusers": Vocabulary("diffusers", DIFFUSERS_WORDS, tuple(mappings))}


def diffusers_name(unet: dict, name: str) -> str | None:
    """Canonical (LDM) name → the diffusers module path, or None for a name outside the UNet's
    blocks (the inverse of the 'diffusers' vocabulary)."""
    reverse = {ldm: (diffusers, kind) for ldm, diffusers, kind in prefix_pairs(unet)}
    for ldm, (diffusers, kind) in reverse.items():
        if kind == "attention" and name.startswith(ldm + "."):
            return diffusers + name[len(ldm):]
        if kind == "resnet" and name.startswith(ldm + "."):
            layer = name[len(ldm) + 1:]
            for ours, theirs in _RESNET_LAYERS.items():
                if layer == theirs:
                    return f"{diffusers}.{ours}"
        if kind not in ("attention", "resnet") and name == ldm:
            return diffusers
    return None


_BLOCK = re.compile(r"((?:input_blocks|output_blocks)\.\d+\.1|middle_block\.1)\.")


def transformer_block_of(name: str) -> str | None:
    """`input_blocks.4.1.transformer_blocks.0.attn1.to_q` → `input_blocks.4.1`, else None."""
    match = _BLOCK.match(name)
    return match.group(1) if match else None


def block_order_key(block: str) -> tuple[int, int]:
    """Sort key putting UNet blocks in order: input blocks, middle, output blocks."""
    kind, index = block.split(".")[:2]
    return ({"input_blocks": 0, "middle_block": 1, "output_blocks": 2}[kind], int(index))


def block_of(name: str) -> tuple[tuple, str] | None:
    block = transformer_block_of(name)
    return (block_order_key(block), block) if block else None


_ATTENTION_LAYER = re.compile(r"\.attn([12])\.(to_q|to_k|to_v|to_out\.0)$")


def attention_role(name: str) -> tuple[str, str] | None:
    """(role, attention) of a UNet attention projection by its name alone — any UNet with these
    module names (the tiny test and testbed UNets too), not only the published sizes."""
    match = _ATTENTION_LAYER.search(name)
    if match is None:
        return None
    return _ATTENTION[match.group(2)], "self" if match.group(1) == "1" else "cross"
