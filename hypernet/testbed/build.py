"""Build the testbed world: base model, judges, LoRAs, per-pair references, the testbed hypernetwork.

Everything is cached under `<user cache>/testbed/` (`$LORARAR_CACHE`). The base model and the
judges do not depend on the world seed (they know the attribute space, not a world's subjects and
styles): `base/` and `judges/`. Each world lives in `worlds/seed<N>-<sizes>-<key>/`:

    world.json                        subjects, styles (with their regime), held-out names
    images/subjects/<sksN>/k.png      the subject LoRAs' training renders (DreamBooth "photos")
    images/styles/<styN>.png          the style LoRAs' single training image
    images/pairs/<sksN>__<styM>/k.png ground-truth renders of a pair (the reference LoRAs' images)
    loras-<key>/<name>.safetensors    kohya LoRAs (subjects: "a sksN <class>", styles: "a <class> in styN style",
                                      references <sksN>__<styM>: the pair prompt, trained on that pair's renders)
    hypernet-<key>/                   the trainer's run folder: manifest.json (training subjects × styles only),
                                      hypernet.safetensors (the result), build.json (settings, times)

An artefact that is already there is reused, so an interrupted build resumes.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..model import HypernetConfig, HyperNetwork
from ..training.lora_trainer import save_kohya
from . import cache
from . import world as W
from .base import FAMILY, BaseConfig, TestbedBase, measure_throughput, pretrain
from .judges import JudgeSettings
from .loras import LoraJob, StackSettings, train_stacked

log = logging.getLogger(__name__)


@dataclass
class BaseSettings:
    """Pretraining, sized in samples seen (DESIGN §15: small diffusion models learned a synthetic
    compositional world after 0.5–6 M samples; round 2's base saw 0.04 M)."""
    version: int = 3             # of the renderer and the pretraining code: part of the cache key
    samples: int = 500_000
    batch: int = 64
    lr: float = 2e-3
    ema: float = 0.999
    seed: int = 0

    @property
    def steps(self) -> int:
        return max(1, self.samples // self.batch)


@dataclass
class HypernetSettings:
    steps: int = 300
    hidden: int = 128
    lr: float = 0.01
    lam: float = 0.01
    pairs_per_step: int = 2
    seed: int = 0
    dev_subjects: int = 3        # held out of H's training pairs, inside the training split: the
    dev_styles: int = 4          # validation split (both sides unseen; styles half per regime)
    weight_decay: float = 1e-4
    # "default": PyTorch's initialisation (coefficients ≈ 0 at step 0: the merged layers start
    # with neither LoRA); "sum": output weights 0 and bias 1, so H starts as the plain sum
    init: str = "default"
    # "none": H reads the raw ΔW columns (the paper's H); "layer_rms": each side's columns divided
    # by the RMS of that layer's ΔW (DESIGN §12: raw columns are small and H may collapse to its
    # biases). Stored in the hypernetwork's metadata; the merge applies it.
    normalise: str = "none"
    validate_every: int = 50     # 0: validate once, at the end
    validation_draws: int = 2    # (timestep, noise) draws per validation pair
    early_stop: bool = True      # keep the checkpoint with the lowest validation objective
    train_subjects: int = 0      # use only this many of the training subjects / styles (0: all);
    train_styles: int = 0        # for the "number of training LoRAs" sweep


@dataclass
class WorldSettings:
    seed: int = 0
    subjects: int = 20
    styles: int = 24
    test_subjects: int = 5
    test_styles: int = 10        # half per style regime: 25 held-out pairs per regime
    subject_images: int = 4
    reference_images: int = 4    # ground-truth renders a per-pair reference LoRA is trained on
    gate_pairs: int = 12         # training-side pairs per regime that gate 4 measures headroom on
    lora: StackSettings = field(default_factory=StackSettings)
    judges: JudgeSettings = field(default_factory=JudgeSettings)
    hypernet: HypernetSettings = field(default_factory=HypernetSettings)
    base: BaseSettings = field(default_factory=BaseSettings)
    base_config: BaseConfig = field(default_factory=BaseConfig)

    @classmethod
    def tiny(cls, seed: int = 0) -> "WorldSettings":
        """A test-sized world: seconds on a CPU; checks the pipeline, not the quality figures."""
        return cls(seed=seed, subjects=6, styles=6, test_subjects=2, test_styles=2, subject_images=2,
                   reference_images=2, gate_pairs=1, lora=StackSettings(rank=2, steps=3, per_lora_batch=2),
                   judges=JudgeSettings(steps=8, batch=16, width=8, calibration_images=24, sample_prompts=6,
                                        sample_per_prompt=1, sample_steps=2, sample_min_group=1),
                   hypernet=HypernetSettings(steps=2, hidden=8, pairs_per_step=1, dev_subjects=1, dev_styles=2,
                                             validation_draws=1),
                   base=BaseSettings(samples=64, batch=16), base_config=BaseConfig.tiny())

    def world_key(self) -> str:
        """What the world's subjects, styles, split and training images depend on (the training images
        are rendered once into the world's folder, so the renderer's version is part of it)."""
        return cache.key("round3", W.RENDER_VERSION, self.seed, self.subjects, self.styles, self.test_subjects, self.test_styles,
                         self.subject_images, self.reference_images, self.gate_pairs)

    def base_key(self) -> str:
        return cache.key(asdict(self.base_config), asdict(self.base))

    def loras_key(self) -> str:
        # not the group size: a LoRA does not depend on which others share its stacked batch
        # (test_stacked_loras_do_not_depend_on_their_batch_mates), so it only sets the speed
        return cache.key(self.base_key(), {k: v for k, v in asdict(self.lora).items() if k != "group"})

    def judges_key(self) -> str:
        return cache.key(asdict(self.judges))

    def hypernet_key(self, settings: HypernetSettings | None = None) -> str:
        return cache.key(self.loras_key(), asdict(settings or self.hypernet))

    def hypernet_variants(self) -> dict[str, HypernetSettings]:
        """The testbed hypernetworks a world trains, by bench row: H as the paper has it, and the
        same H reading normalised columns (DESIGN §12; issue 18's question)."""
        return {"lorarar": self.hypernet,
                "lorarar normalised": replace(self.hypernet, normalise="layer_rms")}


@dataclass
class BuiltWorld:
    folder: Path
    world: W.World
    settings: WorldSettings
    base_path: Path
    judges_path: Path
    info: dict

    @property
    def lora_dir(self) -> Path:
        return self.folder / f"loras-{self.settings.loras_key()}"

    def lora_path(self, name: str) -> Path:
        return self.lora_dir / f"{name}.safetensors"

    def reference_path(self, subject: str, style: str) -> Path:
        return self.lora_path(pair_name(subject, style))

    @property
    def hypernet_path(self) -> Path:
        return self.hypernet_paths["lorarar"]

    @property
    def hypernet_paths(self) -> dict[str, Path]:
        """Bench row → file of every testbed hypernetwork of the world (`hypernet_variants`)."""
        return {row: self.folder / f"hypernet-{self.settings.hypernet_key(h)}" / "hypernet.safetensors"
                for row, h in self.settings.hypernet_variants().items()}

    def subject_images(self, name: str) -> list[Path]:
        return sorted((self.folder / "images" / "subjects" / name).glob("*.png"))

    def style_image(self, name: str) -> Path:
        return self.folder / "images" / "styles" / f"{name}.png"

    def pair_images(self, subject: str, style: str) -> list[Path]:
        return sorted((self.folder / "images" / "pairs" / pair_name(subject, style)).glob("*.png"))

    @property
    def gate_pairs(self) -> list[tuple[str, str]]:
        return gate_pairs(self.world, self.settings.gate_pairs)

    def base(self) -> TestbedBase:
        return TestbedBase.load(self.base_path)

    def judges(self):
        from .judges import Judges

        return Judges.load(self.judges_path)


def pair_name(subject: str, style: str) -> str:
    return f"{subject}__{style}"


def gate_pairs(world: W.World, per_regime: int) -> list[tuple[str, str]]:
    """Pairs of training subjects and training styles, `per_regime` of each style regime, drawn once
    per world: where gate 4 looks for headroom without looking at the held-out test pairs."""
    rng = np.random.default_rng(W._seed("gate-pairs", world.seed))
    out = []
    for regime in W.REGIMES:
        pool = [(a, b) for a in world.train_subjects for b in world.train_styles if world.regime(b) == regime]
        out += [pool[i] for i in sorted(rng.choice(len(pool), min(per_regime, len(pool)), replace=False))]
    return out


def _base_path(root: Path, config: BaseConfig, settings: BaseSettings) -> Path:
    return Path(root) / "base" / f"base-{cache.key(asdict(config), asdict(settings))}.safetensors"


def build_base(root: Path, config: BaseConfig, settings: BaseSettings, progress=None) -> tuple[TestbedBase, Path, float]:
    """The pretrained base model (from the cache when it is there). Returns (model, path, seconds spent)."""
    path = _base_path(root, config, settings)
    if path.is_file():
        return TestbedBase.load(path), path, 0.0
    start = time.perf_counter()
    rate, measuring = float("nan"), 0.0
    if settings.steps >= 100:  # a real build: measure first, and say how long it will take
        rate = measure_throughput(config, settings.batch)
        measuring = time.perf_counter() - start
        log.info("base: %.0f samples/s on this machine; %d samples (%d steps × %d) will take ≈ %.0f min",
                 rate, settings.steps * settings.batch, settings.steps, settings.batch,
                 settings.steps * settings.batch / rate / 60)
    model = TestbedBase(config, seed=settings.seed)
    losses = pretrain(model, settings.steps, settings.batch, settings.lr, settings.seed, settings.ema, progress,
                      checkpoint=path.with_suffix(".resume.pt"))
    seconds = time.perf_counter() - start
    model.save(path, extra={"steps": str(settings.steps), "samples": str(settings.steps * settings.batch),
                            "final_loss": f"{np.mean(losses[-50:]):.4f}", "measured_samples_per_s": f"{rate:.1f}",
                            # pretraining over all its runs (a resumed one included), and the measurement
                            "seconds": f"{model.pretrain_seconds + measuring:.1f}",
                            "threads": str(torch.get_num_threads()),
                            "loss_curve": json.dumps([round(float(np.mean(losses[i:i + 100])), 5)
                                                      for i in range(0, len(losses), 100)])})
    return model, path, seconds


def _save_png(array: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def load_png(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def write_images(folder: Path, world: W.World, per_subject: int, per_pair: int,
                 pairs: list[tuple[str, str]]) -> None:
    for subject in world.subjects:
        d = folder / "images" / "subjects" / subject.name
        if len(list(d.glob("*.png"))) >= per_subject:
            continue
        rng = np.random.default_rng(W._seed("subject-photos", world.seed, subject.name))
        for k in range(per_subject):
            _save_png(W.render(subject, W.PLAIN, W.Pose.random(rng)), d / f"{k}.png")
    for style in world.styles:
        path = folder / "images" / "styles" / f"{style.name}.png"
        if not path.is_file():
            obj, pose = world.style_object(style.name)
            _save_png(W.render(obj, style, pose), path)
    for subject, style in pairs:
        d = folder / "images" / "pairs" / pair_name(subject, style)
        if len(list(d.glob("*.png"))) >= per_pair:
            continue
        rng = np.random.default_rng(W._seed("pair-renders", world.seed, subject, style))
        for k in range(per_pair):
            _save_png(W.render(world.subject(subject), world.style(style), W.Pose.random(rng)), d / f"{k}.png")


def lora_jobs(built: "BuiltWorld") -> list[tuple[LoraJob, str]]:
    """Every LoRA of the world, in a fixed order: (job, kind) with kind subject / style / reference."""
    w = built.world
    jobs = []
    for s in w.subjects:
        jobs.append((LoraJob(s.name, tuple(load_png(p) for p in built.subject_images(s.name)), w.subject_prompt(s.name),
                             W._seed("lora", w.seed, s.name) % 2 ** 31), "subject"))
    for s in w.styles:
        jobs.append((LoraJob(s.name, (load_png(built.style_image(s.name)),),
                             w.style_prompt(s.name, w.style_object(s.name)[0].cls),
                             W._seed("lora", w.seed, s.name) % 2 ** 31), "style"))
    for subject, style in w.test_pairs + built.gate_pairs:
        name = pair_name(subject, style)
        jobs.append((LoraJob(name, tuple(load_png(p) for p in built.pair_images(subject, style)),
                             w.pair_prompt(subject, style), W._seed("lora", w.seed, name) % 2 ** 31), "reference"))
    return jobs


def build_loras(built: "BuiltWorld", model: TestbedBase, say, references: bool = True) -> None:
    """Train every LoRA whose file is missing, in stacked groups of near-equal size (at most
    `settings.lora.group`); `references=False`: only the subject and style LoRAs (what gate 3
    needs). A LoRA does not depend on which others share its batch, so a LoRA already on disk is
    never trained again, and a build in stages (gate 3, then gate 4) trains what one build does."""
    jobs = [(job, kind) for job, kind in lora_jobs(built) if references or kind != "reference"]
    missing = [(job, kind) for job, kind in jobs if not built.lora_path(job.name).is_file()]
    done = len(jobs) - len(missing)
    chunks = -(-len(missing) // max(1, built.settings.lora.group))
    for chunk in (missing[i * len(missing) // chunks:(i + 1) * len(missing) // chunks] for i in range(chunks)):
        results = train_stacked(model, [job for job, _ in chunk], built.settings.lora)
        for (job, kind), (factors, loss) in zip(chunk, results):
            save_kohya(factors, built.lora_path(job.name), {
                "lorarar_testbed.kind": kind, "lorarar_testbed.prompt": job.prompt,
                "lorarar_testbed.world_seed": str(built.world.seed), "lorarar_testbed.final_loss": f"{loss:.4f}",
                "lorarar_testbed.note": "LoRA for the LoRA.rar testbed base model, not SDXL"})
        done += len(chunk)
        say("loras", done, len(jobs))


def judges_path(root: Path, settings: JudgeSettings, base_path: Path | None = None) -> Path:
    """Render-calibrated judges depend on their settings and the renderer (RENDER_VERSION: the CNN
    and the thresholds are both made of renders); judges calibrated on base samples also on the
    base (its file name is its own cache key)."""
    from .judges import CALIBRATION_ON

    if settings.calibrate_on not in CALIBRATION_ON:
        raise W.TestbedError(f"judges calibrate_on must be one of {CALIBRATION_ON}, not {settings.calibrate_on!r}")
    if settings.calibrate_on == "renders":
        key = cache.key(asdict(settings), W.RENDER_VERSION)
    else:
        if base_path is None:
            raise W.TestbedError("judges calibrated on base samples need the base model")
        key = cache.key(asdict(settings), W.RENDER_VERSION, Path(base_path).name)
    return Path(root) / "judges" / f"judges-{key}.safetensors"


def build_judges(root: Path, settings: JudgeSettings, say, base: tuple[TestbedBase, Path] | None = None
                 ) -> tuple[Path, float]:
    """The judges (from the cache when there): the CNN is cached on its own (`net-…`), so a change
    of the calibration only recalibrates. `base` (model, its file): for `calibrate_on="base samples"`."""
    from .gates import gate2_prompts
    from .judges import Judges, calibrate_on_samples, train_judges, train_net

    path = judges_path(root, settings, base[1] if base else None)
    if path.is_file():
        return path, 0.0
    start = time.perf_counter()
    net_path = Path(root) / "judges" / f"net-{cache.key(settings.net_key())}.safetensors"
    if net_path.is_file():
        net = Judges.load(net_path).net
    else:
        net = train_net(settings, progress=lambda d, n, loss: say("judges", d, n))
        Judges(net, accuracy={"train_seconds": round(time.perf_counter() - start, 1)}).save(net_path)
    judges = train_judges(settings, net=net)
    if settings.calibrate_on == "base samples":
        calibrate_on_samples(judges, base[0], settings, gate2_prompts(), base[1].name)
    judges.accuracy["train_seconds"] = Judges.load(net_path).accuracy.get("train_seconds")
    judges.save(path)
    return path, time.perf_counter() - start


def build_world(settings: WorldSettings, root: Path | None = None, progress=None, hypernet: bool = True,
                references: bool = True) -> BuiltWorld:
    """Build (or load from the cache) the world for `settings`. `progress(stage, done, total)`.
    `hypernet=False` stops before the testbed hypernetwork (what gates 1–4 need); `references=False`
    also skips the per-pair reference LoRAs (what gate 3 needs: only the subject and style LoRAs)."""
    root = cache.testbed_dir(root)
    say = progress or (lambda stage, done, total: None)
    timings: dict[str, float] = {}
    world = W.World.create(settings.seed, settings.subjects, settings.styles, settings.test_subjects,
                           settings.test_styles)
    folder = root / "worlds" / f"seed{settings.seed}-{settings.subjects}x{settings.styles}-{settings.world_key()}"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "world.json").write_text(json.dumps(world.to_json(), indent=1))
    start = time.perf_counter()
    model, base_path, seconds = build_base(root, settings.base_config, settings.base,
                                           lambda d, n, loss: say("base", d, n))
    timings["base"] = round(seconds, 1)
    judges_file, seconds = build_judges(root, settings.judges, say, (model, base_path))
    timings["judges"] = round(seconds, 1)
    built = BuiltWorld(folder, world, settings, base_path, judges_file, {})
    write_images(folder, world, settings.subject_images, settings.reference_images, world.test_pairs + built.gate_pairs)
    t0 = time.perf_counter()
    build_loras(built, model, say, references=references)
    timings["loras"] = round(time.perf_counter() - t0, 1)
    t0 = time.perf_counter()
    for row, h in settings.hypernet_variants().items() if hypernet else ():
        if not built.hypernet_paths[row].is_file():
            train_hypernet(built, model, lambda d, n: say("hypernet", d, n), h, built.hypernet_paths[row])
    timings["hypernet"] = round(time.perf_counter() - t0, 1)
    timings["total"] = round(time.perf_counter() - start, 1)
    info = {"settings": asdict(settings), "world_seed": world.seed, "base": str(base_path), "judges": str(judges_file),
            "timings_this_run_s": timings, "threads": torch.get_num_threads(),
            "base_pretraining_once_s": float(TestbedBase.load(base_path).metadata.get("seconds", "nan"))}
    info_path = folder / "build.json"
    previous = json.loads(info_path.read_text()) if info_path.is_file() else {}
    info["timings_first_build_s"] = previous.get("timings_first_build_s") or timings
    info_path.write_text(json.dumps(info, indent=1, default=str))
    built.info = info
    return built


def training_pairs_sample(built: BuiltWorld, per_regime: int) -> list[tuple[str, str]]:
    """`per_regime` pairs of each style regime out of the testbed H's own training pairs (from its
    metadata), drawn once per world: where the bench asks whether H fits what it was trained on."""
    from ..model import load_hypernet

    trained = [tuple(p) for p in json.loads(load_hypernet(built.hypernet_path).config.extra["train_pairs"])]
    rng = np.random.default_rng(W._seed("train-pairs-sample", built.world.seed))
    out = []
    for regime in W.REGIMES:
        pool = [p for p in trained if built.world.regime(p[1]) == regime]
        out += [pool[i] for i in sorted(rng.choice(len(pool), min(per_regime, len(pool)), replace=False))]
    return out


def _index(name: str) -> int:
    """sks12 → 12: manifests list subjects and styles in world order."""
    return int("".join(ch for ch in name if ch.isdigit()) or 0)


def dev_split(world: W.World, settings: HypernetSettings) -> tuple[list[str], list[str]]:
    """H's validation subjects and styles: drawn from the training side of the world (never the
    test pairs), both sides unseen in H's training, the way the test split is built."""
    train_subjects = world.train_subjects
    rng = np.random.default_rng(W._seed("dev-split", world.seed))
    dev_subjects = sorted(rng.choice(train_subjects, min(settings.dev_subjects, len(train_subjects) - 1),
                                     replace=False).tolist(), key=_index)
    dev_styles = []
    for i, regime in enumerate(W.REGIMES):  # as many of each regime as the split allows
        pool = [n for n in world.train_styles if world.regime(n) == regime]
        want = settings.dev_styles // 2 + (settings.dev_styles % 2 if i == 0 else 0)
        dev_styles += rng.choice(pool, min(want, len(pool) - 1), replace=False).tolist() if len(pool) > 1 else []
    return dev_subjects, sorted(dev_styles, key=_index)


def write_manifest(built: BuiltWorld, settings: HypernetSettings | None = None, folder: Path | None = None) -> Path:
    w, s = built.world, settings or built.settings.hypernet
    dev_subjects, dev_styles = dev_split(w, s)
    train_subjects = [n for n in w.train_subjects if n not in dev_subjects]
    train_styles = [n for n in w.train_styles if n not in dev_styles]
    # the LoRA-count sweep: fewer training LoRAs (a fixed prefix, so smaller sets nest in larger ones)
    train_subjects = dev_subjects + train_subjects[: s.train_subjects or None]
    train_styles = dev_styles + train_styles[: s.train_styles or None]
    folder = Path(folder or built.hypernet_path.parent)
    images_ref = os.path.relpath(built.folder / "images", folder)

    def lora_ref(n):
        return os.path.relpath(built.lora_path(n), folder)
    data = {
        "resolution": W.SIZE,
        "subjects": [{"name": n, "lora": lora_ref(n), "images": f"{images_ref}/subjects/{n}",
                      "prompt": w.subject_prompt(n), "class_word": w.subject(n).cls} for n in sorted(train_subjects, key=_index)],
        "styles": [{"name": n, "lora": lora_ref(n), "images": f"{images_ref}/styles/{n}.png",
                    "prompt": w.style_prompt(n, w.style_object(n)[0].cls), "style_name": n}
                   for n in sorted(train_styles, key=_index)],
        "split": {"validation_subjects": dev_subjects, "validation_styles": dev_styles},
    }
    path = folder / "manifest.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1))
    return path


def sum_initialised(widths: tuple[int, ...], hidden: int, seed: int) -> HyperNetwork:
    """An H whose output is exactly m = 1 (the plain sum) for every input: head weights 0, bias 1."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        h = HyperNetwork(HypernetConfig(hidden=hidden, widths=tuple(sorted(widths)), base_family=FAMILY))
    with torch.no_grad():
        h.output[1].weight.zero_()
        h.output[1].bias.fill_(1.0)
    return h


def train_hypernet(built: BuiltWorld, model: TestbedBase, progress=None, settings: HypernetSettings | None = None,
                   out: Path | None = None) -> Path:
    """The testbed hypernetwork: the pack's trainer on training subjects × training styles only."""
    from ..model import load_hypernet, save_hypernet
    from ..training.injection import attention_widths, linear_layer_shapes
    from ..training.manifest import load_manifest
    from ..training.trainer import Trainer, TrainSettings

    s = settings or built.settings.hypernet
    out = Path(out or built.hypernet_path)
    run_dir = out.parent
    manifest = load_manifest(write_manifest(built, s, run_dir))
    train_pairs, dev_pairs = manifest.split()
    ts = TrainSettings(steps=s.steps, lr=s.lr, lam=s.lam, seed=s.seed, pairs_per_step=s.pairs_per_step,
                       weight_decay=s.weight_decay, checkpoint_every=s.validate_every if s.early_stop else 0,
                       validate_every=s.validate_every, validation_draws=s.validation_draws, hidden=s.hidden,
                       amp="off", name=f"lorarar-testbed-seed{built.world.seed}", license="same as this package",
                       input_normalisation=s.normalise)
    if s.init not in ("default", "sum"):
        raise W.TestbedError(f"hypernetwork init must be 'default' or 'sum', not {s.init!r}")
    init = None
    if s.init == "sum":
        widths = attention_widths(linear_layer_shapes(model.unet), tuple(ts.targets))
        init = sum_initialised(widths, s.hidden, s.seed)
    trainer = Trainer(model.training_base(), manifest, ts, run_dir, init_hypernet=init)
    result = trainer.run(progress=(lambda d, n, rec: progress(d, n)) if progress else None)
    validations = [r for r in result.history if r.get("kind") == "validation"]
    final = trainer.final_hypernet(result.validation)
    chosen_step = result.step
    if s.early_stop and validations:
        best = min(validations, key=lambda r: r["hypernet"]["total"])
        chosen_step = best["step"]
        if chosen_step != result.step:
            picked = load_hypernet(run_dir / "checkpoints" / f"step_{chosen_step:06d}" / "hypernet.safetensors")
            final.load_state_dict(picked.state_dict())
        final.config.extra["validation_objective_hypernet"] = f"{best['hypernet']['total']:.6g}"
    final.config.extra.update({
        "for": "the LoRA.rar testbed (python -m hypernet testbed / demo); NOT an SDXL hypernetwork",
        "world_seed": str(built.world.seed), "world_subjects": str(len(built.world.subjects)),
        "world_styles": str(len(built.world.styles)),
        "train_pairs": json.dumps([[a.name, b.name] for a, b in train_pairs]),
        "dev_pairs": json.dumps([[a.name, b.name] for a, b in dev_pairs]),
        "test_pairs_never_seen": json.dumps(built.world.test_pairs),
        "base_model": built.base_path.name,
        "chosen_step": str(chosen_step), "init": s.init,
        "validation_curve": json.dumps([[r["step"], round(r["hypernet"]["total"], 5)] for r in validations]),
    })
    final.config.base_family = FAMILY
    return save_hypernet(final, out, force=True)
