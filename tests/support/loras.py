"""LoRA layouts for tests: subsets of SDXL's layers at their real widths (so a default-tier test
checks a property on real shapes without paying for all 722 targets), and files of the kinds a
few tests share (an SD1.5 LoRA, LyCORIS adapters without a low-rank form)."""

from __future__ import annotations

import torch

from hypernet import naming
from hypernet.tooling import synthetic


def sdxl_sample_shapes() -> dict[str, tuple[int, int]]:
    """A sample of SDXL's targets at real widths, in UNet order (40 layers): the whole 640-wide
    `input_blocks.4.1` (proj_in/out and both transformer blocks), the 1280-wide `middle_block.1`'s
    proj_in/out and the attention layers of its first transformer block, CLIP-L's first layer and
    two of CLIP-G's. Every kind of layer is there: hypernetwork layers at both widths, square
    640/1280, the 2048-wide text context, GEGLU and ff out (at 640), text encoders. The 1280-wide
    feed-forward layers are left out on purpose: a dense float64 check of one 10240 × 1280 GEGLU
    layer costs about a second on a busy 2-core machine, and it is summed like its 640-wide twin."""
    keep = ("input_blocks.4.1.", "middle_block.1.proj_", "middle_block.1.transformer_blocks.0.attn")
    unet = {n: s for n, s in naming.sdxl_linear_layers().items() if n.startswith(keep)}
    te = synthetic.text_encoder_layers(1)
    te = {n: s for n, s in te.items() if n.startswith("te1.") or n.endswith(("q_proj", "out_proj"))}
    return {**unet, **te}


def sdxl_every_block_shapes(te_layers: int = 1) -> dict[str, tuple[int, int]]:
    """From each of SDXL's 11 transformer blocks (every name that the diffusers ↔ LDM block
    mapping has to translate): proj_in, proj_out and all layers of the block's last transformer
    block (`transformer_blocks.9` in the depth-10 blocks), at real widths; plus text-encoder
    layers."""
    last = tuple(f"{block}.transformer_blocks.{depth - 1}." for block, _, depth in naming.SDXL_TRANSFORMER_BLOCKS)
    unet = {n: s for n, s in naming.sdxl_linear_layers().items()
            if n.endswith((".proj_in", ".proj_out")) or n.startswith(last)}
    return {**unet, **synthetic.text_encoder_layers(te_layers)}


def sample_lora(rank: int, seed: int, alpha: float | None = None, dtype: torch.dtype = torch.float32,
                shapes: dict[str, tuple[int, int]] | None = None) -> dict[str, torch.Tensor]:
    """A kohya state dict over `shapes` (default: sdxl_sample_shapes), like synthetic.sdxl_lora."""
    shapes = sdxl_sample_shapes() if shapes is None else shapes
    return synthetic.to_state_dict(synthetic.random_factors(shapes, rank, seed, dtype), "kohya", alpha)


def sd15_lora() -> dict[str, torch.Tensor]:
    """An SD1.5 LoRA: 320/640-wide attention, 768-wide text context, `lora_te_` text encoder."""
    shapes = {"input_blocks.1.1.transformer_blocks.0.attn1.to_q": (320, 320),
              "input_blocks.1.1.transformer_blocks.0.attn2.to_k": (320, 768),
              "input_blocks.4.1.transformer_blocks.0.attn1.to_q": (640, 640)}
    sd = synthetic.to_state_dict(synthetic.random_factors(shapes, 4, 0), "kohya")
    sd["lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight"] = torch.zeros(768, 4)
    sd["lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight"] = torch.zeros(4, 768)
    return sd


def loha_lokr_full_dora(out: int = 640, inp: int = 640, r: int = 4) -> dict[str, torch.Tensor]:
    """`input_blocks.4.1.transformer_blocks.0.attn1`: to_q as LoHa, to_k as LoKr, to_v as a full
    difference, to_out.0 as DoRA (kohya key names, as LyCORIS writes them)."""
    g = torch.Generator().manual_seed(0)
    rnd = lambda *s: torch.randn(*s, generator=g) * 0.1  # noqa: E731
    p = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_"
    return {
        f"{p}to_q.hada_w1_a": rnd(out, r), f"{p}to_q.hada_w1_b": rnd(r, inp),
        f"{p}to_q.hada_w2_a": rnd(out, r), f"{p}to_q.hada_w2_b": rnd(r, inp), f"{p}to_q.alpha": torch.tensor(2.0),
        f"{p}to_k.lokr_w1": rnd(8, 8), f"{p}to_k.lokr_w2_a": rnd(80, r), f"{p}to_k.lokr_w2_b": rnd(r, 80),
        f"{p}to_k.alpha": torch.tensor(2.0),
        f"{p}to_v.diff": rnd(out, inp),
        f"{p}to_out_0.lora_up.weight": rnd(out, r), f"{p}to_out_0.lora_down.weight": rnd(r, inp),
        f"{p}to_out_0.dora_scale": rnd(out, 1).abs(),
    }


def lycoris_layers(out: int, inp: int, rank: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    """`input_blocks.4.1.transformer_blocks.0.attn1`: to_q as LoHa, to_v as a full difference,
    to_out.0 as DoRA — adapters without a low-rank form (kohya key names, as LyCORIS writes them)."""
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g) * 0.1  # noqa: E731
    p = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_"
    return {
        f"{p}to_q.hada_w1_a": rnd(out, rank), f"{p}to_q.hada_w1_b": rnd(rank, inp),
        f"{p}to_q.hada_w2_a": rnd(out, rank), f"{p}to_q.hada_w2_b": rnd(rank, inp), f"{p}to_q.alpha": torch.tensor(2.0),
        f"{p}to_v.diff": rnd(out, inp),
        f"{p}to_out_0.lora_up.weight": rnd(out, rank), f"{p}to_out_0.lora_down.weight": rnd(rank, inp),
        f"{p}to_out_0.dora_scale": rnd(out, 1).abs(),
    }
