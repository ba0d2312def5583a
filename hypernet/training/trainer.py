"""Train a LoRA.rar hypernetwork on subject × style LoRA pairs (docs/training.md).

Each step draws random training pairs (one subject image, one style image, a shared timestep
and noise), predicts the merge coefficients with H from the two LoRAs' factors, and minimises
ZipLoRA's objective through the frozen UNet: AdamW (lr 0.01, weight decay 1e-4), gradient
clipping at 1.0, mixed precision on GPU, optional gradient checkpointing. Validation runs the
same objective on held-out pairs (unseen subjects × unseen styles) for H and for the plain sum.

Every step also records how much H's output depends on its input — per width |W1·x| / |b1| and
the spread of the coefficients over the columns — and warns when that collapses (docs/methods.md, "What the hypernetwork contributes").

Outputs in the run folder: `train_log.jsonl` (every loss term of every step, the input dependence,
validation records), `checkpoints/step_NNNNNN/` (resumable exactly), `loss.png`, and the final
hypernetwork (our safetensors format; metadata records base, widths, targets, data summary,
steps and the final validation figures).
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..errors import TrainingError
from ..model import DEFAULT_TARGETS, INPUT_NORMALISATIONS, HypernetConfig, HyperNetwork, save_hypernet
from .checkpoint import load_checkpoint, save_checkpoint
from .data import Example, LoraCache, TrainingBase, encode_examples, load_image
from .ddp import World
from .injection import Coefficients, LoraInjection, attention_widths, checkpointed_blocks, linear_layer_shapes
from .manifest import Entry, Manifest
from .objective import LAMBDA, Sample, draw_noise, ones_coefficients, ziplora_objective
from .plot import plot_panels, smooth

log = logging.getLogger(__name__)

TERMS = ("total", "content", "style", "cosine")


@dataclass
class TrainSettings:
    steps: int = 300
    lr: float = 0.01
    weight_decay: float = 1e-4
    grad_clip: float = 1.0
    lam: float = LAMBDA
    seed: int = 0
    pairs_per_step: int = 1          # over all ranks; a multiple of the number of ranks
    checkpoint_every: int = 100      # 0: only at the end
    validate_every: int = 100        # 0: only at the end
    validation_draws: int = 2        # (timestep, noise) draws per validation pair
    hidden: int = 128
    targets: tuple[str, ...] = DEFAULT_TARGETS
    amp: str = "auto"                # auto | off | fp16 | bf16
    gradient_checkpointing: bool = False
    lora_cache: int = 8
    name: str = ""
    license: str = ""
    input_normalisation: str = "none"  # how H reads its columns (model.INPUT_NORMALISATIONS); kept in its metadata


@dataclass
class TrainResult:
    hypernet: HyperNetwork
    step: int
    validation: dict | None
    output: Path | None
    log_path: Path
    plot_path: Path | None
    history: list[dict] = field(default_factory=list)


# Collapse: H's output no longer depends on its input — its coefficients barely vary over the
# columns, or the input's term W1·x is negligible next to the bias b1 (docs/methods.md, "What the hypernetwork contributes") — at every width.
COLLAPSE_SPREAD = 0.01
COLLAPSE_INPUT_TO_BIAS = 0.01
# per width, summed over the columns of every coefficient layer of a step's pairs:
# columns, Σ|W1·x_j|, Σm_c, Σm_c², Σm_s, Σm_s²
_STAT_FIELDS = 6


class CoefficientModel(nn.Module):
    """H applied to every coefficient layer of an attached pair. This is the module DDP wraps:
    DDP's gradient sync hooks into its forward. Each forward also adds, per width, what the
    trainer watches for collapse (`stats()`; detached, kept on H's device until read)."""

    def __init__(self, hypernet: HyperNetwork):
        super().__init__()
        self.hypernet = hypernet
        self._stats: dict[int, torch.Tensor] = {}

    def reset_stats(self) -> None:
        self._stats = {}

    def stats(self) -> torch.Tensor:
        """(widths, 6) float64 on the CPU: per width of H columns, Σ|W1·x_j|, Σm_c, Σm_c², Σm_s, Σm_s²."""
        out = torch.zeros(len(self.hypernet.widths), _STAT_FIELDS, dtype=torch.float64)
        for index, row in self._stats.items():
            out[index] = row.double().cpu()
        return out

    def forward(self, injection: LoraInjection) -> Coefficients:
        out = {}
        for name in injection.target_layers:
            adapter = injection.adapters[name]
            c, s = adapter.content, adapter.style
            if c.up is not None and s.up is not None:
                m_c, m_s, norms = self.hypernet.coefficients_factored(c.up, c.down, s.up, s.down, input_norms=True)
                width = c.up.shape[-2]
            else:  # LoHa/LoKr/DoRA: no factored form, feed dense columns
                dense_c = c.dense if c.dense is not None else c.up @ c.down
                dense_s = s.dense if s.dense is not None else s.up @ s.down
                m_c, m_s, norms = self.hypernet.coefficients_dense(dense_c, dense_s, input_norms=True)
                width = dense_c.shape[0]
            out[name] = (m_c, m_s)
            with torch.no_grad():  # on H's device: no wait for it per layer
                m_c, m_s = m_c.detach().float(), m_s.detach().float()
                row = torch.stack([torch.ones_like(m_c).sum(), norms.float().sum(), m_c.sum(), (m_c * m_c).sum(),
                                   m_s.sum(), (m_s * m_s).sum()])
                index = self.hypernet.widths.index(width)
                self._stats[index] = self._stats[index] + row if index in self._stats else row
        return out


def input_dependence(hypernet: HyperNetwork, stats: torch.Tensor) -> dict:
    """Per width seen: |W1·x|/|b1| (mean over columns) and the coefficients' spread over columns
    (standard deviation of m_c and m_s), from `CoefficientModel.stats()`."""
    out = {"input_to_bias": {}, "spread": {}}
    for width, row in zip(hypernet.widths, stats.tolist()):
        columns = row[0]
        if not columns:
            continue
        bias = float(hypernet.input_layer(width).bias.detach().norm())
        variance = [max(row[k + 1] / columns - (row[k] / columns) ** 2, 0.0) for k in (2, 4)]
        out["input_to_bias"][str(width)] = row[1] / columns / bias if bias > 0 else float("inf")
        out["spread"][str(width)] = [v ** 0.5 for v in variance]
    return out


def collapsed(dependence: dict) -> bool:
    """True when, at every width seen, H's output hardly depends on its input."""
    widths = dependence["spread"]
    return bool(widths) and all(max(dependence["spread"][w]) < COLLAPSE_SPREAD
                                or dependence["input_to_bias"][w] < COLLAPSE_INPUT_TO_BIAS for w in widths)


def build_hypernet(widths: tuple[int, ...], settings: TrainSettings, family: str,
                   init: HyperNetwork | None = None) -> HyperNetwork:
    """A trainable H for these widths; from `init` when given (new widths get new input layers)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        if init is None:
            config = HypernetConfig(hidden=settings.hidden, widths=tuple(sorted(widths)),
                                    targets=tuple(settings.targets), base_family=family)
            model = HyperNetwork(config)
        else:
            all_widths = tuple(sorted(set(init.widths) | set(widths)))
            config = HypernetConfig(hidden=init.config.hidden, widths=all_widths, targets=tuple(settings.targets),
                                    base_family=family)
            model = HyperNetwork(config)
            own = model.state_dict()
            own.update({k: v for k, v in init.state_dict().items() if k in own})
            model.load_state_dict(own)
            new = sorted(set(widths) - set(init.widths))
            if new:
                log.info("new input layers for widths %s (initialised at random)", new)
    model.config.name, model.config.license = settings.name, settings.license
    if settings.input_normalisation not in INPUT_NORMALISATIONS:
        raise TrainingError(f"input_normalisation: expected one of {', '.join(INPUT_NORMALISATIONS)}, "
                            f"got {settings.input_normalisation!r}")
    model.config.extra["input_normalisation"] = settings.input_normalisation
    return model.float().train().requires_grad_(True)


class Trainer:
    def __init__(self, base: TrainingBase, manifest: Manifest, settings: TrainSettings, out_dir: Path,
                 world: World | None = None, init_hypernet: HyperNetwork | None = None,
                 resume: Path | None = None):
        self.base, self.manifest, self.settings = base, manifest, settings
        self.out_dir = Path(out_dir)
        self.world = world or World(device=base.device)
        if settings.pairs_per_step % self.world.world_size:
            raise TrainingError(f"pairs per step ({settings.pairs_per_step}) must be a multiple of the "
                                f"number of processes ({self.world.world_size})")
        self.train_pairs, self.val_pairs = manifest.split()
        if not self.train_pairs:
            raise TrainingError(f"{manifest.path}: no training pairs left after the validation split")
        shapes = linear_layer_shapes(base.unet)
        self.widths = attention_widths(shapes, tuple(settings.targets))
        if not self.widths:
            raise TrainingError("the base model has no attention layers ending in "
                                f"{'/'.join(settings.targets)}; is it a UNet with transformer blocks?")
        self.device = base.device
        self.step = 0
        self.hypernet = build_hypernet(self.widths, settings, base.family, init_hypernet).to(self.device)
        self.optimizer = torch.optim.AdamW(self.hypernet.parameters(), lr=settings.lr,
                                           weight_decay=settings.weight_decay)
        self.amp_dtype = self._amp_dtype()
        use_scaler = self.amp_dtype == torch.float16
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=use_scaler) if use_scaler else None
        if resume is not None:
            self._resume(Path(resume))
        unused = bool(set(self.hypernet.widths) - set(self.widths))
        self.coefficient_model = self.world.wrap(CoefficientModel(self.hypernet), find_unused=unused)
        self.loras = LoraCache(settings.lora_cache)
        self.examples: dict[tuple[str, str], list[Example]] = {}
        self.log_path = self.out_dir / "train_log.jsonl"
        self._sum_validation: list[float] | None = None
        self._collapse_warned: int | None = None  # step of the last collapse warning

    # -- setup -------------------------------------------------------------------------------------

    def _amp_dtype(self) -> torch.dtype | None:
        amp = self.settings.amp
        if amp == "off" or self.device.type != "cuda":
            if amp in ("fp16", "bf16") and self.device.type != "cuda":
                log.warning("mixed precision %s needs a GPU; training in float32 on %s", amp, self.device)
            return None
        if amp == "auto":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return {"fp16": torch.float16, "bf16": torch.bfloat16}[amp]

    def _resume(self, path: Path) -> None:
        state = load_checkpoint(path)
        if state.hypernet.widths != self.hypernet.widths or state.hypernet.config.hidden != self.hypernet.config.hidden:
            raise TrainingError(f"{path}: checkpoint hypernetwork (widths {state.hypernet.widths}, hidden "
                                f"{state.hypernet.config.hidden}) does not fit this run (widths "
                                f"{self.hypernet.widths}, hidden {self.hypernet.config.hidden})")
        self.hypernet.load_state_dict(state.hypernet.state_dict())
        self.optimizer.load_state_dict(state.optimizer_state)
        if self.scaler is not None and state.scaler_state:
            self.scaler.load_state_dict(state.scaler_state)
        self.step = state.step
        log.info("resumed from %s at step %d", path, self.step)

    def prepare(self) -> None:
        """Encode every image and prompt once (latents and conditioning stay on the device)."""
        resolution = self.manifest.resolution or self.base.resolution
        entries = {(e.kind, e.name): e for pair in self.train_pairs + self.val_pairs for e in pair}
        for key, entry in entries.items():
            images = [load_image(p, resolution) for p in entry.images]
            self.examples[key] = encode_examples(self.base.encoder, images, entry.prompt, self.device)
        log.info("encoded %d entries at %d px", len(entries), resolution)

    # -- one objective evaluation ------------------------------------------------------------------

    def _draw(self, generator: torch.Generator, subject: Entry, style: Entry) -> tuple[Sample, int, torch.Tensor]:
        subjects, styles = self.examples[("subject", subject.name)], self.examples[("style", style.name)]
        sub = subjects[int(torch.randint(len(subjects), (1,), generator=generator))]
        sty = styles[int(torch.randint(len(styles), (1,), generator=generator))]
        sample = Sample(sub[0], sub[1], sty[0], sty[1])
        t, noise = draw_noise(tuple(sub[0].shape), generator, self.base.schedule.num_timesteps)
        return sample, t, noise

    def _objective(self, subject: Entry, style: Entry, sample: Sample, t: int, noise: torch.Tensor,
                   coefficients_fn: Callable[[LoraInjection], Coefficients]):
        content, style_lora = self.loras.get(subject.lora), self.loras.get(style.lora)
        with LoraInjection(self.base.unet, content, style_lora, tuple(self.settings.targets),
                           device=self.device) as injection:
            return ziplora_objective(injection, self.base.denoise, self.base.schedule, sample,
                                     coefficients_fn(injection), t, noise, self.settings.lam, self.amp_dtype)

    def _step_generator(self, step: int) -> torch.Generator:
        return torch.Generator().manual_seed((self.settings.seed * 1_000_003 + step) % (2 ** 63))

    # -- training ----------------------------------------------------------------------------------

    def train_step(self) -> dict:
        s, world = self.settings, self.world
        generator = self._step_generator(self.step)
        draws = []
        for _ in range(s.pairs_per_step):  # every rank draws all pairs; each takes its share
            subject, style = self.train_pairs[int(torch.randint(len(self.train_pairs), (1,), generator=generator))]
            draws.append((subject, style, *self._draw(generator, subject, style)))
        local = draws[world.rank::world.world_size]
        self.optimizer.zero_grad(set_to_none=True)
        sums = torch.zeros(len(TERMS), dtype=torch.float64)
        model = self.coefficient_model
        coefficient_model = self._unwrapped()
        coefficient_model.reset_stats()
        for index, (subject, style, sample, t, noise) in enumerate(local):
            last = index == len(local) - 1
            sync = contextlib.nullcontext() if last or not world.distributed else model.no_sync()
            with sync, torch.enable_grad():
                terms = self._objective(subject, style, sample, t, noise, model)
                loss = terms.total / len(local)
                (self.scaler.scale(loss) if self.scaler else loss).backward()
            sums += torch.tensor([terms.as_dict()[k] for k in TERMS], dtype=torch.float64)
        world.all_reduce_sum(sums)  # before any rank may raise below, so all ranks decide alike
        stats = world.all_reduce_sum(coefficient_model.stats())
        if self.scaler is None and not torch.isfinite(sums).all():
            # Without AMP's scaler (which skips such steps) a NaN objective would train H into NaN
            # weights and save them as a "trained" hypernetwork.
            raise TrainingError(
                f"step {self.step + 1}: the objective is not finite ({', '.join(f'{k} {float(v):.4g}' for k, v in zip(TERMS, sums))}) "
                f"for pairs {[[d[0].name, d[1].name] for d in draws]}; the base model, its VAE/text encoder or "
                "a LoRA produces NaN/Inf. Nothing was saved from this step on")
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.hypernet.parameters(), s.grad_clip))
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.step += 1
        record = {"step": self.step, "kind": "train", **{k: float(v) / s.pairs_per_step for k, v in zip(TERMS, sums)},
                  "grad_norm": grad_norm, "lr": self.optimizer.param_groups[0]["lr"],
                  "pairs": [[d[0].name, d[1].name] for d in draws],
                  **input_dependence(self.hypernet, stats)}
        self._watch_collapse(record)
        return record

    def _unwrapped(self) -> CoefficientModel:
        model = self.coefficient_model
        return model.module if hasattr(model, "module") else model

    def _watch_collapse(self, record: dict) -> None:
        """Warn when H's output stops depending on its input: at the first such step, then again
        every validation interval (or 100 steps) while it lasts."""
        record["collapsed"] = collapsed(record)
        if not record["collapsed"]:
            self._collapse_warned = None
            return
        every = self.settings.validate_every or 100
        if self._collapse_warned is None or self.step - self._collapse_warned >= every:
            self._collapse_warned = self.step
            log.warning(
                "step %d: the hypernetwork's coefficients hardly depend on its input any more (%s): it is "
                "collapsing to a fixed recipe. Its inputs may be too small next to its first layer's bias "
                "(real LoRAs are), or weight decay and the learning rate push it there", self.step,
                "; ".join(f"{w}-wide |W1·x|/|b1| {record['input_to_bias'][w]:.3g}, spread m_c "
                          f"{record['spread'][w][0]:.3g} m_s {record['spread'][w][1]:.3g}" for w in record["spread"]))

    @torch.no_grad()
    def validate(self) -> dict | None:
        """Mean objective over validation pairs × draws, for H and for the plain sum (m = 1)."""
        if not self.val_pairs:
            return None
        model = self._unwrapped()
        sums = torch.zeros(2, len(TERMS) + 1, dtype=torch.float64)
        count = torch.zeros(1, dtype=torch.float64)
        was_training = self.hypernet.training
        self.hypernet.eval()
        for index in range(self.world.rank, len(self.val_pairs), self.world.world_size):
            subject, style = self.val_pairs[index]
            for draw in range(self.settings.validation_draws):
                generator = torch.Generator().manual_seed(self.settings.seed * 7919 + index * 101 + draw)
                sample, t, noise = self._draw(generator, subject, style)
                for row, fn in enumerate((model, lambda inj: ones_coefficients(inj, self.device))):
                    if row == 1 and self._sum_validation is not None:
                        continue  # the sum does not train: same draws, same figures as last time
                    d = self._objective(subject, style, sample, t, noise, fn).as_dict()
                    sums[row] += torch.tensor([d[k] for k in TERMS] + [d["content"] + d["style"]], dtype=torch.float64)
                count += 1
        self.hypernet.train(was_training)
        self.world.all_reduce_sum(sums)
        self.world.all_reduce_sum(count)
        mean = (sums / count.clamp(min=1)).tolist()
        if self._sum_validation is None:
            self._sum_validation = mean[1]
        mean[1] = self._sum_validation
        keys = TERMS + ("mse",)
        return {"step": self.step, "kind": "validation", "pairs": len(self.val_pairs),
                "hypernet": dict(zip(keys, mean[0])), "sum": dict(zip(keys, mean[1]))}

    def run(self, output: Path | None = None, force: bool = False,
            progress: Callable[[int, int, dict], None] | None = None) -> TrainResult:
        s, world = self.settings, self.world
        if not self.examples:
            self.prepare()
        if self.base.before_training:
            self.base.before_training()
        if world.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            self._truncate_log()
        history: list[dict] = []
        validation = None
        start = time.perf_counter()
        with checkpointed_blocks(self.base.unet, s.gradient_checkpointing and self.device.type == "cuda"):
            while self.step < s.steps:
                if self.base.check_interrupt:
                    self.base.check_interrupt()
                record = self.train_step()
                record["seconds"] = round(time.perf_counter() - start, 3)
                history.append(record)
                self._log(record)
                done = self.step == s.steps
                if (s.validate_every and self.step % s.validate_every == 0) or done:
                    validation = self.validate()
                    if validation:
                        self._log(validation)
                        history.append(validation)
                        log.info("step %d validation objective: hypernet %.5g, sum %.5g", self.step,
                                 validation["hypernet"]["total"], validation["sum"]["total"])
                if (s.checkpoint_every and self.step % s.checkpoint_every == 0) or done:
                    self.save_checkpoint()
                if progress:
                    progress(self.step, s.steps, record)
        plot_path = self.write_plot() if world.is_main else None
        out_path = None
        if output is not None and world.is_main:
            out_path = save_hypernet(self.final_hypernet(validation), Path(output), force=force)
            log.info("saved the hypernetwork to %s", out_path)
        world.barrier()
        return TrainResult(self.hypernet, self.step, validation, out_path, self.log_path, plot_path, history)

    # -- files -------------------------------------------------------------------------------------

    def _log(self, record: dict) -> None:
        if self.world.is_main:
            with self.log_path.open("a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")

    def _truncate_log(self) -> None:
        """On resume, drop log lines from after the checkpoint (they will be redone)."""
        if not self.log_path.exists():
            return
        keep = [line for line in self.log_path.read_text(encoding="utf-8").splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= self.step]
        tmp = self.log_path.with_suffix(".tmp")
        tmp.write_text("".join(line + "\n" for line in keep), encoding="utf-8")
        tmp.replace(self.log_path)

    def save_checkpoint(self) -> None:
        if self.world.is_main:
            extra = {"seed": self.settings.seed, "settings": asdict(self.settings),
                     "manifest": str(self.manifest.path), "world_size": self.world.world_size}
            folder = save_checkpoint(self.out_dir / "checkpoints", self.step, self.hypernet, self.optimizer,
                                     self.scaler.state_dict() if self.scaler else {}, extra)
            log.info("checkpoint %s", folder)
        self.world.barrier()

    def final_hypernet(self, validation: dict | None) -> HyperNetwork:
        model = HyperNetwork(self.hypernet.config)
        model.load_state_dict({k: v.detach().float().cpu() for k, v in self.hypernet.state_dict().items()})
        extra = dict(self.hypernet.config.extra)
        extra.update({
            "trained_by": "lorarar train (ZipLoRA objective)", "base": self.base.description,
            "steps": str(self.step), "data": json.dumps(self.manifest.summary()),
            "settings": json.dumps({k: v for k, v in asdict(self.settings).items() if k not in ("name", "license")}),
            "processes": str(self.world.world_size),
        })
        if validation:
            extra["validation_objective_hypernet"] = f"{validation['hypernet']['total']:.6g}"
            extra["validation_objective_sum"] = f"{validation['sum']['total']:.6g}"
            extra["validation_mse_hypernet"] = f"{validation['hypernet']['mse']:.6g}"
            extra["validation_mse_sum"] = f"{validation['sum']['mse']:.6g}"
        model.config.extra = extra
        return model.eval().requires_grad_(False)

    def write_plot(self) -> Path:
        records = [json.loads(line) for line in self.log_path.read_text(encoding="utf-8").splitlines() if line.strip()]
        train = [r for r in records if r.get("kind") == "train"]
        val = [r for r in records if r.get("kind") == "validation"]
        series = {"train (smoothed)": list(zip([r["step"] for r in train], smooth([r["total"] for r in train])))}
        if val:
            series["val: hypernet"] = [(r["step"], r["hypernet"]["total"]) for r in val]
            series["val: sum"] = [(r["step"], r["sum"]["total"]) for r in val]
        watch = {}
        for width in sorted({w for r in train for w in r.get("input_to_bias", {})}, key=int):
            steps = [r for r in train if width in r.get("input_to_bias", {})]
            watch[f"|W1x|/|b1|, {width}-wide"] = list(zip([r["step"] for r in steps],
                                                         smooth([r["input_to_bias"][width] for r in steps])))
            watch[f"spread, {width}-wide"] = list(zip([r["step"] for r in steps],
                                                     smooth([max(r["spread"][width]) for r in steps])))
        path = self.out_dir / "loss.png"
        image = plot_panels([
            (series, "LoRA.rar hypernetwork training: ZipLoRA objective", False),
            (watch, "input dependence: |W1·x|/|b1| and coefficient spread (smoothed; log scale; near 0 = collapse)",
             True)])
        tmp = path.with_suffix(".tmp.png")
        image.save(tmp)
        tmp.replace(path)
        return path
