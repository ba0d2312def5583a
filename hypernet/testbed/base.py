"""The testbed's base model: a small text-conditioned pixel-space diffusion UNet.

The UNet is the test UNet of `training/testmodel.py` (SDXL's LDM module names, no attention on
the first level, two attention widths on the next two, as SDXL has 640/1280), run on
32×32 RGB images folded 2×2 into 12 channels at 16×16 (`pixel_unshuffle`: lossless, no VAE).
Prompts go through a small learned token encoder (`TokenEncoder`): a learned vector per known
word plus a learned position vector. Words it never learned — the DreamBooth tokens `sksN`,
`styN` — get a fixed pseudo-random vector from a hash of the word, scaled to the learned
vectors' size, as a rare token of a real text encoder has an embedding nobody trained.

`TestbedBase` implements what the pack's trainer and ZipLoRA need (`training.data.TrainingBase`:
`encode_image`, `encode_prompt`, `denoise`, schedule), and the DDIM sampler `sample`, which
applies a weight patch per denoising step (`patches(p)` with p = fraction of sampling done), so
merges whose weights depend on sampling progress (K-LoRA) are sampled as they are meant to be.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..training.injection import find_module
from ..training.objective import DiscreteSchedule
from ..training.testmodel import LdmUNet, UNetConfig
from . import world as W

log = logging.getLogger(__name__)

MAX_TOKENS = 16
FAMILY = "lorarar-testbed"
# classifier-free guidance scale of every sampler call that does not name one (a sampling choice,
# not part of the model, so it stays out of the cached base's key)
GUIDANCE = 2.0


def base_vocabulary() -> list[str]:
    words = ["", "a", "with", "in", "style", *W.CLASSES, *W.MARKINGS, *W.HUES, *W.MARK_COLOURS]
    for feature in W.FEATURES:
        words += [w for w in W.STYLE_WORDS[feature].values() if w]
    return list(dict.fromkeys(words))


@dataclass
class BaseConfig:
    # 32 channels at 16×16: with 16 (round 2's width), the level that turns 12 folded channels back
    # into pixels was the bottleneck — samples of 0.6 M steps were right in shape and colour but
    # speckled pixel by pixel (gate 2: texture read right on 61%, analysis by synthesis accepted
    # 21%). 32 costs 1.3× the time per sample; the attention levels (widths 32, 48) are unchanged.
    channels: tuple[int, int, int] = (32, 32, 48)
    transformer_depth: tuple[int, int, int] = (0, 1, 1)
    context_dim: int = 32
    head_dim: int = 16
    groups: int = 8
    # v-prediction (DESIGN §15): v-loss = x0-loss · (1 + SNR) keeps weight on the low-noise steps
    # that draw markings and edges, which round 2's plain x0-loss all but ignored (its samples were
    # blurry blobs); unlike ε-loss (x0-loss · SNR) it also keeps the high-noise steps that lay out
    # the picture. "sample" (x0) and "epsilon" remain for comparison.
    prediction: str = "v"
    vocabulary: list[str] = field(default_factory=base_vocabulary)

    @classmethod
    def tiny(cls) -> "BaseConfig":
        return cls(channels=(8, 16, 24), context_dim=16, head_dim=8, groups=4)

    def unet_config(self) -> UNetConfig:
        return UNetConfig(channels=tuple(self.channels), transformer_depth=tuple(self.transformer_depth),
                          context_dim=self.context_dim, adm_in_channels=None, in_channels=12,
                          head_dim=self.head_dim, groups=self.groups)


class TokenEncoder(nn.Module):
    def __init__(self, vocabulary: list[str], dim: int):
        super().__init__()
        self.vocabulary = list(vocabulary)
        self.index = {w: i for i, w in enumerate(self.vocabulary)}
        self.embedding = nn.Embedding(len(self.vocabulary), dim)
        self.position = nn.Parameter(torch.zeros(MAX_TOKENS, dim))
        nn.init.normal_(self.embedding.weight, std=1.0)
        self.dim = dim

    def rare_vector(self, word: str) -> torch.Tensor:
        seed = int.from_bytes(hashlib.sha256(("rare:" + word).encode()).digest()[:8], "little")
        v = torch.randn(self.dim, generator=torch.Generator().manual_seed(seed))
        size = self.embedding.weight.detach().norm(dim=1).mean()
        return v / v.norm() * size

    def forward(self, prompts: list[str]) -> torch.Tensor:
        out = torch.zeros(len(prompts), MAX_TOKENS, self.dim)
        for b, prompt in enumerate(prompts):
            words = prompt.lower().split()[:MAX_TOKENS]
            known = [(i, self.index[w]) for i, w in enumerate(words) if w in self.index]
            if known:
                pos, ids = zip(*known)
                out[b, list(pos)] = self.embedding(torch.tensor(ids))
            for i, w in enumerate(words):
                if w not in self.index:
                    out[b, i] = self.rare_vector(w)
        return out + self.position[None]


def linear_schedule(steps: int = 1000) -> DiscreteSchedule:
    """DDPM's linear β schedule (pixel-space diffusion)."""
    betas = torch.linspace(1e-4, 0.02, steps, dtype=torch.float64)
    return DiscreteSchedule(torch.cumprod(1 - betas, dim=0))


def to_latent(images: torch.Tensor) -> torch.Tensor:
    """IMAGE [B, 32, 32, 3] in 0..1 → (B, 12, 16, 16) in -1..1."""
    return F.pixel_unshuffle(images.permute(0, 3, 1, 2).float() * 2 - 1, 2)


def from_latent(latent: torch.Tensor) -> torch.Tensor:
    """(B, 12, 16, 16) → uint8 numpy (B, 32, 32, 3)."""
    x = F.pixel_shuffle(latent.float(), 2).clamp(-1, 1)
    return ((x.permute(0, 2, 3, 1) + 1) * 127.5 + 0.5).clamp(0, 255).to(torch.uint8).numpy()


def uint8_to_image(batch: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(batch, dtype=np.float32)) / 255.0


class TestbedBase:
    """UNet + token encoder + schedule; the `TrainingBase` pieces and a sampler."""

    def __init__(self, config: BaseConfig, seed: int = 0):
        self.config = config
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.unet = LdmUNet(config.unet_config())
            self.encoder_net = TokenEncoder(config.vocabulary, config.context_dim)
        self.unet.eval().requires_grad_(False)
        self.encoder_net.eval().requires_grad_(False)
        self.schedule = linear_schedule()
        self.metadata: dict[str, str] = {}
        self.guidance = GUIDANCE
        self.pretrain_seconds = 0.0

    # -- TrainingBase protocol (training/data.py) ---------------------------------------------------

    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        return to_latent(image)

    def encode_prompt(self, text: str, latent_shape: tuple[int, ...] = ()) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            return {"context": self.encoder_net([text])}

    def contexts(self, prompts: list[str]) -> torch.Tensor:
        with torch.no_grad():
            return self.encoder_net(prompts)

    def denoise(self, x: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
        return self.unet(x, t, context=cond["context"])

    def training_base(self, description: str = ""):
        from ..training.data import TrainingBase

        return TrainingBase(unet=self.unet, denoise=self.denoise, schedule=self.schedule, encoder=self,
                            resolution=W.SIZE, family=FAMILY,
                            description=description or f"LoRA.rar testbed base ({self.widths_text}-wide attention)",
                            device=torch.device("cpu"))

    @property
    def widths_text(self) -> str:
        return "/".join(map(str, self.config.unet_config().attention_widths))

    # -- sampling ---------------------------------------------------------------------------------

    def x0_and_eps(self, x: torch.Tensor, out: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The UNet's output at x_t (ᾱ = a) as (x0, ε), whatever it predicts."""
        p = self.config.prediction
        if p == "v":
            x0 = a.sqrt() * x - (1 - a).sqrt() * out
        elif p == "sample":
            x0 = out
        elif p == "epsilon":
            x0 = (x - (1 - a).sqrt() * out) / a.sqrt()
        else:
            raise W.TestbedError(f"unknown prediction {p!r}")
        x0 = x0.clamp(-1, 1)
        return x0, (x - a.sqrt() * x0) / (1 - a).sqrt()

    @torch.no_grad()
    def sample(self, prompts: list[str], noise: torch.Tensor, steps: int = 20,
               patches: Callable[[float], dict[str, torch.Tensor] | None] | None = None,
               batch: int = 128, guidance: float | None = None) -> np.ndarray:
        """DDIM (η = 0) from `noise` (B, 12, 16, 16); `patches(p)` gives ΔW per layer for sampling
        progress p (None: keep the previous patch). `guidance` (default: the config's): classifier-
        free guidance against the empty prompt (the base is pretrained with 10% empty prompts), with
        the patch applied to both passes, as ComfyUI applies a LoRA; 1 is plain conditional
        sampling. Returns uint8 (B, 32, 32, 3)."""
        guidance = self.guidance if guidance is None else guidance
        context = self.contexts(prompts)
        if guidance != 1.0:  # one pass over [conditional; unconditional]
            context = torch.cat([context, self.contexts([""]).expand(len(prompts), -1, -1)])
        ac = self.schedule.alphas_cumprod.float()
        times = torch.linspace(len(ac) - 1, 0, steps).round().long()
        x = noise.clone().float()
        n = len(x)

        def run(t, inputs):
            return torch.cat([self.unet(inputs[s:s + batch], t.float().expand(len(inputs[s:s + batch])),
                                        context=context[s:s + batch]) for s in range(0, len(inputs), batch)])
        with WeightPatch(self.unet) as patcher:
            for i, t in enumerate(times):
                if patches is not None:
                    delta = patches(i / steps)
                    if delta is not None:
                        patcher.set(delta)
                a = ac[t]
                a_prev = ac[times[i + 1]] if i + 1 < steps else torch.tensor(1.0)
                if guidance != 1.0:
                    both = run(t, torch.cat([x, x]))
                    out = both[n:] + guidance * (both[:n] - both[n:])
                else:
                    out = run(t, x)
                x0, eps = self.x0_and_eps(x, out, a)
                x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
        return from_latent(x)

    # -- files ------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, torch.Tensor]:
        sd = {f"unet.{k}": v for k, v in self.unet.state_dict().items()}
        sd.update({f"encoder.{k}": v for k, v in self.encoder_net.state_dict().items()})
        return sd

    def save(self, path: Path, dtype: torch.dtype = torch.float32, extra: dict | None = None) -> Path:
        from safetensors.torch import save_file

        meta = {"format": "lorarar-testbed-base", "config": json.dumps(asdict(self.config)),
                "family": FAMILY, "note": "LoRA.rar testbed base model (not SDXL)", **(extra or {})}
        sd = {k: v.detach().to(dtype).contiguous() for k, v in self.state_dict().items()}
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        save_file(sd, str(tmp), meta)
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: Path) -> "TestbedBase":
        from ..safetensors_io import load_safetensors

        tensors, meta = load_safetensors(Path(path))
        if meta.get("format") != "lorarar-testbed-base":
            raise W.TestbedError(f"{path}: not a testbed base model")
        raw = json.loads(meta["config"])
        config = BaseConfig(**{k: tuple(v) if isinstance(v, list) and k != "vocabulary" else v for k, v in raw.items()})
        model = cls(config)
        model.unet.load_state_dict({k[5:]: v.float() for k, v in tensors.items() if k.startswith("unet.")})
        model.encoder_net.load_state_dict({k[8:]: v.float() for k, v in tensors.items() if k.startswith("encoder.")})
        model.metadata = meta
        return model


class WeightPatch:
    """Adds ΔW to named Linear/Conv weights (canonical LDM names); restores them on exit."""

    def __init__(self, unet: nn.Module):
        self.unet = unet
        self.saved: dict[str, torch.Tensor] = {}

    def __enter__(self) -> "WeightPatch":
        return self

    def set(self, deltas: dict[str, torch.Tensor]) -> None:
        self.restore()
        for name, delta in deltas.items():
            module = find_module(self.unet, name)
            if module is None:
                raise KeyError(f"the testbed UNet has no layer {name}")
            self.saved[name] = module.weight.data.clone()
            module.weight.data += delta.reshape(module.weight.shape).to(module.weight.dtype)

    def restore(self) -> None:
        for name, weight in self.saved.items():
            find_module(self.unet, name).weight.data.copy_(weight)
        self.saved = {}

    def __exit__(self, *exc) -> None:
        self.restore()


# ---------------------------------------------------------------------------------------------
# Pretraining on generic renders

def diffusion_target(prediction: str, x0: torch.Tensor, noise: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """What the UNet learns to output at x_t = √a·x0 + √(1-a)·ε."""
    if prediction == "v":
        return a.sqrt() * noise - (1 - a).sqrt() * x0
    if prediction == "sample":
        return x0
    if prediction == "epsilon":
        return noise
    raise W.TestbedError(f"unknown prediction {prediction!r}")


def pretraining_batch(rng: np.random.Generator, batch: int, avoid: set) -> tuple[np.ndarray, list[str]]:
    """Random objects of the whole attribute space in random styles, never a composition in
    `avoid`; prompts describe them, with word groups dropped at random (each kept with
    probability 0.75: the base must also draw "a ball" or "a red ball in warm style") and 10%
    empty (for classifier-free guidance)."""
    items, prompts = [], []
    for _ in range(batch):
        subject, style = W.generic_subject(rng, avoid), W.generic_style(rng)
        items.append((subject, style, W.Pose.random(rng)))
        keep = rng.random(3) < 0.75
        prompts.append("" if rng.random() < 0.1 else W.describe_prompt(subject, style, keep))
    return W.render_batch(items), prompts


def measure_throughput(config: BaseConfig, batch: int = 64, steps: int = 6, seed: int = 0) -> float:
    """Pretraining samples per second on this machine (render + forward + backward + AdamW), measured
    over `steps` steps after one warm-up step: what the build sizes the pretraining by."""
    model = TestbedBase(config, seed=seed)
    params = list(model.unet.parameters()) + list(model.encoder_net.parameters())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=1e-4)
    rng = np.random.default_rng(seed)
    ac = model.schedule.alphas_cumprod.float()
    start = 0.0
    for step in range(steps + 1):
        if step == 1:
            start = time.perf_counter()
        images, prompts = pretraining_batch(rng, batch, set())
        x0 = to_latent(uint8_to_image(images))
        t = torch.randint(0, len(ac), (batch,))
        noise = torch.randn(x0.shape)
        a = ac[t].reshape(-1, 1, 1, 1)
        out = model.unet(a.sqrt() * x0 + (1 - a).sqrt() * noise, t.float(), context=model.encoder_net(prompts))
        loss = F.mse_loss(out, diffusion_target(config.prediction, x0, noise, a))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return steps * batch / (time.perf_counter() - start)


def pretrain(model: TestbedBase, steps: int, batch: int = 64, lr: float = 2e-3, seed: int = 0,
             ema: float = 0.999, progress: Callable[[int, int, float], None] | None = None,
             checkpoint: Path | None = None, checkpoint_every: int = 500) -> list[float]:
    """Pretrain UNet and token encoder together on `pretraining_batch`es; the model keeps the
    exponential moving average of the weights (decay `ema`), which samples far cleaner than the
    last iterate of a small model. Compositions of `W.held_out_compositions()` are never shown.
    With `checkpoint`, the whole state (weights, average, optimiser, schedule, random streams) is
    saved there every `checkpoint_every` steps and a run resumes from it: on a shared CPU the
    pretraining takes tens of minutes and an interruption costs only the steps since the last one."""
    unet, enc = model.unet, model.encoder_net
    unet.train().requires_grad_(True)
    enc.train().requires_grad_(True)
    params = list(unet.parameters()) + list(enc.parameters())
    averaged = [p.detach().clone() for p in params]
    # foreach: the same update (bitwise, checked over a whole pretraining by the clean build) in a quarter
    # less time than the per-tensor loop CPU tensors get by default
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4, foreach=True)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.03)
    rng = np.random.default_rng(W._seed("pretrain3", seed))
    gen = torch.Generator().manual_seed(seed)
    avoid = W.held_out_compositions()
    ac = model.schedule.alphas_cumprod.float()
    losses: list[float] = []
    first, spent = 0, 0.0   # steps and seconds of earlier runs of this pretraining
    if checkpoint is not None and Path(checkpoint).is_file():
        state = torch.load(checkpoint, weights_only=True)
        unet.load_state_dict(state["unet"])
        enc.load_state_dict(state["encoder"])
        with torch.no_grad():
            for q, v in zip(averaged, state["averaged"]):
                q.copy_(v)
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["schedule"])
        gen.set_state(state["generator"])
        rng.bit_generator.state = json.loads(state["numpy_rng"])
        losses, first, spent = [float(x) for x in state["losses"]], int(state["step"]), float(state["seconds"])
        log.info("pretraining resumes at step %d of %d (%s)", first, steps, checkpoint)
    start = time.perf_counter()
    for step in range(first, steps):
        images, prompts = pretraining_batch(rng, batch, avoid)
        x0 = to_latent(uint8_to_image(images))
        t = torch.randint(0, len(ac), (batch,), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        a = ac[t].reshape(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        loss = F.mse_loss(unet(xt, t.float(), context=enc(prompts)), diffusion_target(model.config.prediction, x0, noise, a))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        # a short warm-up of the average (decay grows to `ema`): the first weights are noise
        decay = min(ema, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(averaged, [p.detach() for p in params], 1 - decay)
        losses.append(float(loss.detach()))
        if progress and (step + 1) % 50 == 0:
            progress(step + 1, steps, float(np.mean(losses[-50:])))
        if checkpoint is not None and (step + 1) % checkpoint_every == 0 and step + 1 < steps:
            tmp = Path(checkpoint).with_suffix(".tmp")
            tmp.parent.mkdir(parents=True, exist_ok=True)
            torch.save({"unet": unet.state_dict(), "encoder": enc.state_dict(), "averaged": averaged,
                        "optimizer": opt.state_dict(), "schedule": sched.state_dict(), "generator": gen.get_state(),
                        "numpy_rng": json.dumps(rng.bit_generator.state), "losses": torch.tensor(losses),
                        "step": step + 1, "seconds": spent + time.perf_counter() - start}, tmp)
            tmp.replace(checkpoint)
    with torch.no_grad():
        for p, q in zip(params, averaged):
            p.copy_(q)
    unet.eval().requires_grad_(False)
    enc.eval().requires_grad_(False)
    seconds = time.perf_counter() - start
    log.info("pretrained the base: %d steps × %d = %d samples, %d of them in this run in %.0f s (%.0f samples/s), "
             "final loss %.4f", steps, batch, steps * batch, (steps - first) * batch, seconds,
             (steps - first) * batch / max(seconds, 1e-9), float(np.mean(losses[-50:])))
    if checkpoint is not None and Path(checkpoint).is_file():
        Path(checkpoint).unlink()
    model.pretrain_seconds = spent + seconds   # all runs of it, for the build's report
    return losses
