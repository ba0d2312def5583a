"""LoRA files as each family's trainers write them, key for key, for the reading tests.

The keys here are written out literally from what each trainer saves (kohya sd-scripts and
musubi-tuner: `lora_unet_<ComfyUI/BFL name with _>` + `.lora_down/.lora_up/.alpha`; diffusers, peft
and ai-toolkit: `transformer.<diffusers name>.lora_A/.lora_B`; OneTrainer: `lora_transformer_…`;
SimpleTuner's LyCORIS: `lycoris_…`; XLabs: `….processor.qkv_lora1.down.weight`; ComfyUI's own
training node and ai-toolkit's ComfyUI exports: `diffusion_model.…`; DiffSynth: no prefix) — never
made by the library's naming functions, so the tests check the reader against the trainers, not
against itself. Shapes are the published models' (a few blocks each, small ranks), and `expected`
gives, per module, the canonical weight and the parts it must land on.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

H = 3072  # Flux.1 and Qwen-Image hidden width


@dataclass(frozen=True)
class Layout:
    family: str
    layout: str                      # the key layout the reader must report
    suffixes: tuple[str, str, str | None]   # down, up, alpha (None: the trainer writes no alpha)
    modules: tuple[tuple[str, tuple[int, int], str, tuple[str, ...]], ...]  # (module key, (out, in), canonical, parts)


KOHYA = (".lora_down.weight", ".lora_up.weight", ".alpha")
PEFT = (".lora_A.weight", ".lora_B.weight", None)
XLABS = (".down.weight", ".up.weight", None)


def _key(prefix: str, sep: str, path: str) -> str:
    """A trainer's key for a dotted module path: dotted, or flattened kohya-style (sep "_")."""
    return prefix + (path if sep == "." else path.replace(".", "_"))


def _flux_double(prefix: str, i: int, sep: str) -> list:
    """Flux.1 double block i in diffusers names (sep "." dotted, "_" flattened)."""
    def key(path: str) -> str:
        return _key(prefix, sep, path)

    b, d = f"transformer_blocks{sep}{i}", f"double_blocks.{i}"
    return [
        (key(f"{b}.attn.to_q"), (H, H), f"{d}.img_attn.qkv", ("q",)),
        (key(f"{b}.attn.to_k"), (H, H), f"{d}.img_attn.qkv", ("k",)),
        (key(f"{b}.attn.to_v"), (H, H), f"{d}.img_attn.qkv", ("v",)),
        (key(f"{b}.attn.to_out.0"), (H, H), f"{d}.img_attn.proj", ()),
        (key(f"{b}.attn.add_q_proj"), (H, H), f"{d}.txt_attn.qkv", ("q",)),
        (key(f"{b}.attn.add_k_proj"), (H, H), f"{d}.txt_attn.qkv", ("k",)),
        (key(f"{b}.attn.add_v_proj"), (H, H), f"{d}.txt_attn.qkv", ("v",)),
        (key(f"{b}.attn.to_add_out"), (H, H), f"{d}.txt_attn.proj", ()),
        (key(f"{b}.ff.net.0.proj"), (4 * H, H), f"{d}.img_mlp.0", ()),
        (key(f"{b}.ff.net.2"), (H, 4 * H), f"{d}.img_mlp.2", ()),
        (key(f"{b}.ff_context.net.0.proj"), (4 * H, H), f"{d}.txt_mlp.0", ()),
        (key(f"{b}.ff_context.net.2"), (H, 4 * H), f"{d}.txt_mlp.2", ()),
        (key(f"{b}.norm1.linear"), (6 * H, H), f"{d}.img_mod.lin", ()),
        (key(f"{b}.norm1_context.linear"), (6 * H, H), f"{d}.txt_mod.lin", ()),
    ]


def _flux_single(prefix: str, i: int, sep: str) -> list:
    def key(path: str) -> str:
        return _key(prefix, sep, path)

    b, s = f"single_transformer_blocks{sep}{i}", f"single_blocks.{i}"
    return [
        (key(f"{b}.attn.to_q"), (H, H), f"{s}.linear1", ("q",)),
        (key(f"{b}.attn.to_k"), (H, H), f"{s}.linear1", ("k",)),
        (key(f"{b}.attn.to_v"), (H, H), f"{s}.linear1", ("v",)),
        (key(f"{b}.proj_mlp"), (4 * H, H), f"{s}.linear1", ("mlp_in",)),
        (key(f"{b}.proj_out"), (H, 5 * H), f"{s}.linear2", ()),
        (key(f"{b}.norm.linear"), (3 * H, H), f"{s}.modulation.lin", ()),
    ]


def _flux_bfl(prefix: str, sep: str, blocks=(0, 18), singles=(0, 37)) -> list:
    def key(path: str) -> str:
        return _key(prefix, sep, path)

    out = []
    for i in blocks:
        for stream in ("img", "txt"):
            d = f"double_blocks.{i}.{stream}"
            out += [(key(f"{d}_attn.qkv"), (3 * H, H), f"{d}_attn.qkv", ()),
                    (key(f"{d}_attn.proj"), (H, H), f"{d}_attn.proj", ()),
                    (key(f"{d}_mlp.0"), (4 * H, H), f"{d}_mlp.0", ()),
                    (key(f"{d}_mlp.2"), (H, 4 * H), f"{d}_mlp.2", ()),
                    (key(f"{d}_mod.lin"), (6 * H, H), f"{d}_mod.lin", ())]
    for i in singles:
        s = f"single_blocks.{i}"
        out += [(key(f"{s}.linear1"), (7 * H, H), f"{s}.linear1", ()),
                (key(f"{s}.linear2"), (H, 5 * H), f"{s}.linear2", ()),
                (key(f"{s}.modulation.lin"), (3 * H, H), f"{s}.modulation.lin", ())]
    return out


def _qwen(prefix: str, sep: str, blocks=(0, 59)) -> list:
    def key(path: str) -> str:
        return _key(prefix, sep, path)

    out = []
    for i in blocks:
        b = f"transformer_blocks.{i}"
        for name, shape in (("attn.to_q", (H, H)), ("attn.to_k", (H, H)), ("attn.to_v", (H, H)),
                            ("attn.add_q_proj", (H, H)), ("attn.add_k_proj", (H, H)), ("attn.add_v_proj", (H, H)),
                            ("attn.to_out.0", (H, H)), ("attn.to_add_out", (H, H)),
                            ("img_mlp.net.0.proj", (4 * H, H)), ("img_mlp.net.2", (H, 4 * H)),
                            ("txt_mlp.net.0.proj", (4 * H, H)), ("txt_mlp.net.2", (H, 4 * H)),
                            ("img_mod.1", (6 * H, H)), ("txt_mod.1", (6 * H, H))):
            out.append((key(f"{b}.{name}"), shape, f"{b}.{name}", ()))
    return out


def _sd3(prefix: str, sep: str, diffusers: bool, blocks=(0, 37), h: int = 2432) -> list:
    def key(path: str) -> str:
        return _key(prefix, sep, path)

    out = []
    for i in blocks:
        j = f"joint_blocks.{i}"
        if diffusers:
            b = f"transformer_blocks.{i}"
            out += [(key(f"{b}.attn.to_q"), (h, h), f"{j}.x_block.attn.qkv", ("q",)),
                    (key(f"{b}.attn.to_k"), (h, h), f"{j}.x_block.attn.qkv", ("k",)),
                    (key(f"{b}.attn.to_v"), (h, h), f"{j}.x_block.attn.qkv", ("v",)),
                    (key(f"{b}.attn.add_q_proj"), (h, h), f"{j}.context_block.attn.qkv", ("q",)),
                    (key(f"{b}.attn.to_out.0"), (h, h), f"{j}.x_block.attn.proj", ()),
                    (key(f"{b}.ff.net.0.proj"), (4 * h, h), f"{j}.x_block.mlp.fc1", ()),
                    (key(f"{b}.ff_context.net.2"), (h, 4 * h), f"{j}.context_block.mlp.fc2", ()),
                    (key(f"{b}.norm1.linear"), (6 * h, h), f"{j}.x_block.adaLN_modulation.1", ())]
        else:
            out += [(key(f"{j}.x_block.attn.qkv"), (3 * h, h), f"{j}.x_block.attn.qkv", ()),
                    (key(f"{j}.context_block.attn.qkv"), (3 * h, h), f"{j}.context_block.attn.qkv", ()),
                    (key(f"{j}.x_block.attn.proj"), (h, h), f"{j}.x_block.attn.proj", ()),
                    (key(f"{j}.x_block.mlp.fc1"), (4 * h, h), f"{j}.x_block.mlp.fc1", ()),
                    (key(f"{j}.x_block.adaLN_modulation.1"), (6 * h, h), f"{j}.x_block.adaLN_modulation.1", ())]
    return out


ZH, ZF = 3840, 10240  # Z-Image width and feed-forward width


def _z_image(prefix: str, sep: str, diffusers: bool, layers=(0, 29)) -> list:
    def key(path: str) -> str:
        return _key(prefix, sep, path)

    out = []
    for i in layers:
        b = f"layers.{i}"
        if diffusers:
            out += [(key(f"{b}.attention.to_q"), (ZH, ZH), f"{b}.attention.qkv", ("q",)),
                    (key(f"{b}.attention.to_k"), (ZH, ZH), f"{b}.attention.qkv", ("k",)),
                    (key(f"{b}.attention.to_v"), (ZH, ZH), f"{b}.attention.qkv", ("v",)),
                    (key(f"{b}.attention.to_out.0"), (ZH, ZH), f"{b}.attention.out", ())]
        else:
            out += [(key(f"{b}.attention.qkv"), (3 * ZH, ZH), f"{b}.attention.qkv", ()),
                    (key(f"{b}.attention.out"), (ZH, ZH), f"{b}.attention.out", ())]
        out += [(key(f"{b}.feed_forward.w1"), (ZF, ZH), f"{b}.feed_forward.w1", ()),
                (key(f"{b}.feed_forward.w2"), (ZH, ZF), f"{b}.feed_forward.w2", ()),
                (key(f"{b}.feed_forward.w3"), (ZF, ZH), f"{b}.feed_forward.w3", ())]
    return out


WH, WF = 5120, 13824  # Wan 2.1 14B width and feed-forward width


def _wan(prefix: str, sep: str, diffusers: bool, blocks=(0, 39)) -> list:
    def key(path: str) -> str:
        return _key(prefix, sep, path)

    out = []
    for i in blocks:
        b = f"blocks.{i}"
        names = [("self_attn.q", "attn1.to_q"), ("self_attn.k", "attn1.to_k"), ("self_attn.v", "attn1.to_v"),
                 ("self_attn.o", "attn1.to_out.0"), ("cross_attn.q", "attn2.to_q"), ("cross_attn.k", "attn2.to_k"),
                 ("cross_attn.v", "attn2.to_v"), ("cross_attn.o", "attn2.to_out.0")]
        for ours, theirs in names:
            out.append((key(f"{b}.{theirs if diffusers else ours}"), (WH, WH), f"{b}.{ours}", ()))
        out += [(key(f"{b}.{'ffn.net.0.proj' if diffusers else 'ffn.0'}"), (WF, WH), f"{b}.ffn.0", ()),
                (key(f"{b}.{'ffn.net.2' if diffusers else 'ffn.2'}"), (WH, WF), f"{b}.ffn.2", ())]
    return out


def _xlabs() -> list:
    out = []
    for i in (0, 18):
        d = f"double_blocks.{i}"
        out += [(f"{d}.processor.qkv_lora1", (3 * H, H), f"{d}.img_attn.qkv", ()),
                (f"{d}.processor.proj_lora1", (H, H), f"{d}.img_attn.proj", ()),
                (f"{d}.processor.qkv_lora2", (3 * H, H), f"{d}.txt_attn.qkv", ()),
                (f"{d}.processor.proj_lora2", (H, H), f"{d}.txt_attn.proj", ())]
    for i in (0, 37):
        s = f"single_blocks.{i}"
        out += [(f"{s}.processor.qkv_lora", (3 * H, H), f"{s}.linear1", ("q", "k", "v")),
                (f"{s}.processor.proj_lora", (H, 5 * H), f"{s}.linear2", ())]
    return out


LAYOUTS = {
    # Flux.1
    "flux-kohya": Layout("flux1", "kohya", KOHYA, tuple(_flux_bfl("lora_unet_", "_"))),
    "flux-comfyui": Layout("flux1", "ComfyUI", KOHYA, tuple(_flux_bfl("diffusion_model.", "."))),
    "flux-diffusers": Layout("flux1", "diffusers save_lora_weights", PEFT,
                             tuple(_flux_double("transformer.", 0, ".") + _flux_double("transformer.", 18, ".")
                                   + _flux_single("transformer.", 0, ".") + _flux_single("transformer.", 37, "."))),
    "flux-onetrainer": Layout("flux1", "OneTrainer", KOHYA,
                              tuple(_flux_double("lora_transformer_", 0, "_") + _flux_single("lora_transformer_", 37, "_"))),
    "flux-diffsynth": Layout("flux1", "diffusers names without a prefix (DiffSynth, save_attn_procs)", PEFT,
                             tuple(_flux_double("", 18, ".") + _flux_single("", 37, "."))),
    "flux-xlabs": Layout("flux1", "XLabs", XLABS, tuple(_xlabs())),
    # SD3.5 Large
    "sd3-kohya": Layout("sd3", "kohya", KOHYA, tuple(_sd3("lora_unet_", "_", False))),
    "sd3-diffusers": Layout("sd3", "diffusers save_lora_weights", PEFT, tuple(_sd3("transformer.", ".", True))),
    "sd3-peft": Layout("sd3", "peft save_pretrained", PEFT, tuple(_sd3("base_model.model.", ".", True))),
    "sd3-onetrainer": Layout("sd3", "OneTrainer", KOHYA, tuple(_sd3("lora_transformer_", "_", True))),
    # Qwen-Image
    "qwen-musubi": Layout("qwen_image", "kohya", KOHYA, tuple(_qwen("lora_unet_", "_"))),
    "qwen-diffsynth": Layout("qwen_image", "diffusers names without a prefix (DiffSynth, save_attn_procs)", PEFT,
                             tuple(_qwen("", "."))),
    "qwen-aitoolkit": Layout("qwen_image", "diffusers save_lora_weights", PEFT, tuple(_qwen("transformer.", "."))),
    "qwen-comfyui": Layout("qwen_image", "ComfyUI", PEFT, tuple(_qwen("diffusion_model.", "."))),
    "qwen-lycoris": Layout("qwen_image", "LyCORIS (SimpleTuner)", KOHYA, tuple(_qwen("lycoris_", "_"))),
    # Z-Image
    "zimage-aitoolkit": Layout("z_image", "ComfyUI", PEFT, tuple(_z_image("diffusion_model.", ".", True))),
    "zimage-diffusers": Layout("z_image", "diffusers save_lora_weights", PEFT, tuple(_z_image("transformer.", ".", True))),
    "zimage-kohya": Layout("z_image", "kohya", KOHYA, tuple(_z_image("lora_unet_", "_", False))),
    # Wan 2.1 14B
    "wan-musubi": Layout("wan", "kohya", KOHYA, tuple(_wan("lora_unet_", "_", False))),
    "wan-aitoolkit": Layout("wan", "ComfyUI", PEFT, tuple(_wan("diffusion_model.", ".", False))),
    "wan-diffusers": Layout("wan", "diffusers save_lora_weights", PEFT, tuple(_wan("transformer.", ".", True))),
}


def state_dict(layout: Layout, rank: int = 2, seed: int = 0, alpha: float | None = None,
               dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """The file's tensors: per module a down (rank, in) and an up (out, rank), values of a trained
    LoRA's order, and an alpha where the trainer writes one (default: the rank)."""
    gen = torch.Generator().manual_seed(seed)
    down_suffix, up_suffix, alpha_suffix = layout.suffixes
    out = {}
    for key, (rows, cols), _, _ in layout.modules:
        out[key + down_suffix] = (torch.randn(rank, cols, generator=gen) / cols ** 0.5).to(dtype)
        out[key + up_suffix] = (torch.randn(rows, rank, generator=gen) * 0.02).to(dtype)
        if alpha_suffix:
            out[key + alpha_suffix] = torch.tensor(float(alpha if alpha is not None else rank))
    return out
