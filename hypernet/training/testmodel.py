"""A small UNet with SDXL's LDM module names, and a matching toy image/prompt encoder.

It exists so that injection, the ZipLoRA objective and the trainer can run (and be tested)
without ComfyUI or a multi-gigabyte checkpoint. The module tree mirrors ComfyUI's
`UNetModel` for SDXL — `input_blocks.4.1.transformer_blocks.0.attn1.to_q`, `ff.net.0.proj`,
`proj_in`, ResBlocks with `in_layers.2`/`out_layers.3`/`emb_layers.1` — so canonical LoRA
layer names resolve exactly as they do on the real model. `UNetConfig.sdxl()` builds the
real SDXL topology (320/640/1280, transformer depths 0/2/10, 2048-wide context, 2816-wide `y`)
for the GPU benchmark; `UNetConfig.tiny()` is 16/32/64 wide and runs in milliseconds.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class UNetConfig:
    channels: tuple[int, int, int] = (16, 32, 64)     # per resolution level
    transformer_depth: tuple[int, int, int] = (0, 1, 1)
    context_dim: int = 32
    adm_in_channels: int | None = 24                  # SDXL's `y` (pooled text + size embedding)
    in_channels: int = 4
    head_dim: int = 16
    groups: int = 8

    @classmethod
    def tiny(cls) -> "UNetConfig":
        return cls()

    @classmethod
    def small(cls) -> "UNetConfig":
        """A moderately sized CPU model (~1/4 of SDXL's widths, SDXL's depths 0/2/4)."""
        return cls(channels=(80, 160, 320), transformer_depth=(0, 2, 4), context_dim=256,
                   adm_in_channels=256, head_dim=40, groups=16)

    @classmethod
    def sdxl(cls) -> "UNetConfig":
        return cls(channels=(320, 640, 1280), transformer_depth=(0, 2, 10), context_dim=2048,
                   adm_in_channels=2816, head_dim=64, groups=32)

    @property
    def attention_widths(self) -> tuple[int, ...]:
        return tuple(c for c, d in zip(self.channels, self.transformer_depth) if d)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class CrossAttention(nn.Module):
    def __init__(self, width: int, context_dim: int | None, head_dim: int):
        super().__init__()
        self.heads = max(1, width // head_dim)
        context_dim = context_dim or width
        self.to_q = nn.Linear(width, width, bias=False)
        self.to_k = nn.Linear(context_dim, width, bias=False)
        self.to_v = nn.Linear(context_dim, width, bias=False)
        self.to_out = nn.Sequential(nn.Linear(width, width), nn.Dropout(0.0))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        b, n, _ = x.shape
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
        q, k, v = (t.reshape(b, t.shape[1], self.heads, -1).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, -1)
        return self.to_out(out)


class GEGLU(nn.Module):
    def __init__(self, width: int, inner: int):
        super().__init__()
        self.proj = nn.Linear(width, inner * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.net = nn.Sequential(GEGLU(width, width * 4), nn.Dropout(0.0), nn.Linear(width * 4, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    def __init__(self, width: int, context_dim: int, head_dim: int):
        super().__init__()
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(width), nn.LayerNorm(width), nn.LayerNorm(width)
        self.attn1 = CrossAttention(width, None, head_dim)
        self.attn2 = CrossAttention(width, context_dim, head_dim)
        self.ff = FeedForward(width)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    def __init__(self, width: int, depth: int, context_dim: int, head_dim: int, groups: int):
        super().__init__()
        self.norm = nn.GroupNorm(groups, width, eps=1e-6)
        self.proj_in = nn.Linear(width, width)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(width, context_dim, head_dim) for _ in range(depth))
        self.proj_out = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        y = self.proj_in(self.norm(x).flatten(2).transpose(1, 2))
        for block in self.transformer_blocks:
            y = block(y, context)
        return x + self.proj_out(y).transpose(1, 2).reshape(b, c, h, w)


class ResBlock(nn.Module):
    def __init__(self, channels: int, out_channels: int, emb_dim: int, groups: int):
        super().__init__()
        self.in_layers = nn.Sequential(nn.GroupNorm(groups, channels), nn.SiLU(),
                                       nn.Conv2d(channels, out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, out_channels))
        self.out_layers = nn.Sequential(nn.GroupNorm(groups, out_channels), nn.SiLU(), nn.Dropout(0.0),
                                        nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip_connection = nn.Identity() if channels == out_channels else nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x) + self.emb_layers(emb)[:, :, None, None]
        return self.skip_connection(x) + self.out_layers(h)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class TimestepEmbedSequential(nn.Sequential):
    def forward(self, x, emb, context):  # noqa: D102 - same dispatch as LDM's
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


class LdmUNet(nn.Module):
    """SDXL-style UNet: 3 levels, 2 ResBlocks per level down, 3 up, transformers per config.

    forward(x, timesteps, context, y) — the signature of ComfyUI's UNetModel.
    """

    def __init__(self, config: UNetConfig = UNetConfig()):
        super().__init__()
        self.config = config
        c0 = config.channels[0]
        emb_dim = 4 * c0
        self.model_channels = c0
        self.time_embed = nn.Sequential(nn.Linear(c0, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        if config.adm_in_channels:
            self.label_emb = nn.Sequential(nn.Sequential(
                nn.Linear(config.adm_in_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim)))

        def level_block(ch_in: int, ch_out: int, level: int) -> list[nn.Module]:
            layers: list[nn.Module] = [ResBlock(ch_in, ch_out, emb_dim, config.groups)]
            if config.transformer_depth[level]:
                layers.append(SpatialTransformer(ch_out, config.transformer_depth[level], config.context_dim,
                                                 config.head_dim, config.groups))
            return layers

        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(nn.Conv2d(config.in_channels, c0, 3, padding=1))])
        skip_channels, ch = [c0], c0
        for level, width in enumerate(config.channels):
            for _ in range(2):
                self.input_blocks.append(TimestepEmbedSequential(*level_block(ch, width, level)))
                ch = width
                skip_channels.append(ch)
            if level < len(config.channels) - 1:
                self.input_blocks.append(TimestepEmbedSequential(Downsample(ch)))
                skip_channels.append(ch)
        top = len(config.channels) - 1
        self.middle_block = TimestepEmbedSequential(
            ResBlock(ch, ch, emb_dim, config.groups),
            SpatialTransformer(ch, config.transformer_depth[top], config.context_dim, config.head_dim, config.groups),
            ResBlock(ch, ch, emb_dim, config.groups))
        self.output_blocks = nn.ModuleList()
        for level in reversed(range(len(config.channels))):
            width = config.channels[level]
            for i in range(3):
                layers = level_block(ch + skip_channels.pop(), width, level)
                ch = width
                if level and i == 2:
                    layers.append(Upsample(ch))
                self.output_blocks.append(TimestepEmbedSequential(*layers))
        self.out = nn.Sequential(nn.GroupNorm(config.groups, ch), nn.SiLU(), nn.Conv2d(ch, config.in_channels, 3, padding=1))

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor,
                y: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        timesteps = timesteps.reshape(-1).expand(x.shape[0])
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels).to(x.dtype))
        if self.config.adm_in_channels:
            if y is None:
                raise ValueError("this UNet needs the `y` conditioning (pooled text + size embedding)")
            emb = emb + self.label_emb(y.to(x.dtype))
        hs, h = [], x
        for block in self.input_blocks:
            h = block(h, emb, context)
            hs.append(h)
        h = self.middle_block(h, emb, context)
        for block in self.output_blocks:
            h = block(torch.cat([h, hs.pop()], dim=1), emb, context)
        return self.out(h)


def build_unet(config: UNetConfig = UNetConfig(), seed: int = 0, device=None, dtype=torch.float32) -> LdmUNet:
    """Deterministic weights for a given seed; eval mode, no grad (a frozen base model)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LdmUNet(config)
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


class ToyEncoder:
    """Stands in for VAE + text encoder on the test model: deterministic and cheap.

    Images ([1, H, W, 3] in 0..1, ComfyUI's IMAGE layout) become latents by 8× average pooling
    and a fixed 3→4 channel mix; prompts become a per-token context by hashing each word to a
    seeded random vector, and `y` is the mean of the tokens (a stand-in for the pooled output).
    """

    def __init__(self, config: UNetConfig, tokens: int = 8):
        self.config = config
        self.tokens = tokens
        gen = torch.Generator().manual_seed(1234)
        self.mix = torch.randn(config.in_channels, 3, generator=gen) * 0.5

    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        pixels = image.permute(0, 3, 1, 2).float() * 2 - 1
        pooled = F.avg_pool2d(pixels, 8)
        return torch.einsum("oc,bchw->bohw", self.mix, pooled)

    def _word_vector(self, word: str, dim: int) -> torch.Tensor:
        seed = int.from_bytes(hashlib.sha256(word.encode()).digest()[:8], "little")
        return torch.randn(dim, generator=torch.Generator().manual_seed(seed))

    def encode_prompt(self, text: str, latent_shape: tuple[int, ...]) -> dict[str, torch.Tensor]:
        words = (text.lower().split() or [""])[: self.tokens]
        context = torch.zeros(1, self.tokens, self.config.context_dim)
        for i, word in enumerate(words):
            context[0, i] = self._word_vector(word, self.config.context_dim)
        cond = {"context": context}
        if self.config.adm_in_channels:
            pooled = torch.stack([self._word_vector(w, self.config.adm_in_channels) for w in words]).mean(0)
            cond["y"] = pooled[None]
        return cond


def random_lora(unet: nn.Module, rank: int = 4, seed: int = 0, magnitude: float = 0.5,
                family: str = "kohya", alpha: float | None = None,
                only: str | None = None) -> dict[str, torch.Tensor]:
    """A LoRA state dict for every transformer-block Linear of `unet` (optionally only names
    containing `only`), with ΔW large enough to change the test UNet's output visibly."""
    from ..tooling import synthetic
    from .injection import linear_layer_shapes

    shapes = {n: s for n, s in linear_layer_shapes(unet).items() if only is None or only in n}
    gen = torch.Generator().manual_seed(seed)
    factors = {}
    for name, (out, inp) in shapes.items():
        down = torch.randn(rank, inp, generator=gen) / inp ** 0.5
        up = torch.randn(out, rank, generator=gen) * (magnitude / rank ** 0.5)
        factors[name] = (up, down)
    return synthetic.to_state_dict(factors, family, alpha)


def tiny_base(seed: int = 0, device: str | torch.device = "cpu", config: UNetConfig | None = None,
              resolution: int = 64):
    """The built-in test model as a TrainingBase (`--base tiny` on the command line)."""
    from .data import TrainingBase
    from .objective import DiscreteSchedule, ldm_denoiser

    config = config or UNetConfig.tiny()
    device = torch.device(device)
    unet = build_unet(config, seed, device)
    widths = "/".join(map(str, config.attention_widths))
    return TrainingBase(unet=unet, denoise=ldm_denoiser(unet), schedule=DiscreteSchedule.scaled_linear(),
                        encoder=ToyEncoder(config), resolution=resolution, family="test",
                        description=f"built-in test UNet ({widths}-wide attention, seed {seed})", device=device)


def write_dataset(root: Path, subjects: int = 3, styles: int = 3, images_per_subject: int = 2,
                  config: UNetConfig | None = None, split: dict | None = None, fmt: str = "json") -> Path:
    """LoRAs for the test UNet, random images and a manifest (tests, benchmark); returns the
    manifest path."""
    import json

    import numpy as np
    from PIL import Image
    from safetensors.torch import save_file

    root.mkdir(parents=True, exist_ok=True)
    unet = build_unet(config or UNetConfig.tiny())
    rng = np.random.default_rng(0)
    subject_entries, style_entries = [], []
    for i in range(subjects):
        save_file(random_lora(unet, 4, 10 + i), str(root / f"subj{i}.safetensors"))
        folder = root / f"subj{i}"
        folder.mkdir(exist_ok=True)
        for k in range(images_per_subject):
            Image.fromarray(rng.integers(0, 255, (80, 64, 3), dtype=np.uint8)).save(folder / f"{k}.png")
        subject_entries.append({"name": f"subj{i}", "lora": f"subj{i}.safetensors", "images": f"subj{i}",
                                "prompt": f"a photo of sks{i} dog", "class_word": "dog"})
    for i in range(styles):
        save_file(random_lora(unet, 4, 20 + i), str(root / f"style{i}.safetensors"))
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(root / f"style{i}.png")
        style_entries.append({"name": f"style{i}", "lora": f"style{i}.safetensors", "images": f"style{i}.png",
                              "prompt": f"a cat in style{i} style", "style_name": f"style{i}"})
    data = {"subjects": subject_entries, "styles": style_entries,
            "split": split if split is not None else {"validation_subjects": [f"subj{subjects - 1}"],
                                                      "validation_styles": [f"style{styles - 1}"]}}
    path = root / f"manifest.{fmt}"
    if fmt == "json":
        path.write_text(json.dumps(data, indent=1))
    else:
        import yaml

        path.write_text(yaml.safe_dump(data))
    return path
