"""Build the testbed world: base model, LoRAs, judges and the testbed hypernetwork.

Everything is cached under `<user cache>/testbed/` (`$LORARAR_CACHE`): the base model (it does
not depend on the world seed: it only knows class words and generic style words) in `base/`,
and each world in `worlds/seed<N>-<key>/`:

    world.json                     subjects, styles, held-out names (the ground truth)
    images/subjects/<sksN>/k.png   the subject LoRAs' training renders (DreamBooth "photos")
    images/styles/<styN>.png       the style LoRAs' single training image
    loras-<key>/<name>.safetensors kohya LoRAs (subjects: "a sksN <class>", styles: "a <class> in styN style")
    judges-<key>.safetensors       subject/style classifiers (held-out accuracy in the metadata)
    hypernet-<key>/                the trainer's run folder: manifest.json (training subjects × styles only),
                                   hypernet.safetensors (the result), build.json (settings, times)

An artefact that is already there is reused, so an interrupted build resumes.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..model import HypernetConfig, HyperNetwork
from ..training.lora_trainer import LoraTrainSettings, save_kohya, train_lora
from . import cache
from . import world as W
from .base import FAMILY, BaseConfig, TestbedBase, pretrain, to_latent, uint8_to_image

log = logging.getLogger(__name__)


@dataclass
class BaseSettings:
    steps: int = 1200
    batch: int = 32
    lr: float = 2e-3
    seed: int = 0
    # a second one-cycle stage from the first one's weights (0: none); the first stage is cached
    # on its own, so a longer schedule reuses it
    more_steps: int = 0
    more_lr: float = 1e-3

    def first_stage(self) -> "BaseSettings":
        return BaseSettings(self.steps, self.batch, self.lr, self.seed)


@dataclass
class HypernetSettings:
    steps: int = 300
    hidden: int = 128
    lr: float = 0.01
    lam: float = 0.01
    pairs_per_step: int = 2
    seed: int = 0
    dev_subjects: int = 3        # held out of H's training pairs, inside the training split: the
    dev_styles: int = 3          # validation split (both sides unseen), so test pairs are never looked at
    weight_decay: float = 1e-4
    # "default": PyTorch's initialisation (coefficients ≈ 0 at step 0: the merged layers start
    # with neither LoRA); "sum": output weights 0 and bias 1, so H starts as the plain sum
    init: str = "default"
    validate_every: int = 50     # 0: validate once, at the end
    validation_draws: int = 2    # (timestep, noise) draws per validation pair
    # keep the checkpoint with the lowest validation objective: on world 0 the validation
    # objective is lowest near step 150 and rises after (H overfits its 96 training pairs)
    early_stop: bool = True
    train_subjects: int = 0      # use only this many of the training subjects / styles (0: all);
    train_styles: int = 0        # for the "number of training LoRAs" sweep


_FIRST_HYPERNET_FIELDS = ("steps", "hidden", "lr", "lam", "pairs_per_step", "seed", "dev_subjects", "dev_styles")


@dataclass
class WorldSettings:
    seed: int = 0
    subjects: int = 20
    styles: int = 16
    test_subjects: int = 5
    test_styles: int = 5
    subject_images: int = 4
    lora: LoraTrainSettings = field(default_factory=lambda: LoraTrainSettings(rank=4, steps=100, batch=8, lr=1e-2))
    # subject LoRAs' own settings (None: `lora`, as the style LoRAs). Longer DreamBooth training is
    # what makes the subject recognisable in content-only samples (docs/testbed.md, round 2)
    subject_lora: LoraTrainSettings | None = field(
        default_factory=lambda: LoraTrainSettings(rank=4, steps=300, batch=8, lr=1e-2))
    judge_steps: int = 1600
    judge_batch: int = 64
    judge_eval: int = 3000       # held-out renders for the reported accuracy
    judge_blur: float = 0.5      # share of judge training images blurred (the generator is blurry)
    hypernet: HypernetSettings = field(default_factory=HypernetSettings)
    base: BaseSettings = field(default_factory=BaseSettings)
    base_config: BaseConfig = field(default_factory=BaseConfig)

    @classmethod
    def tiny(cls, seed: int = 0) -> "WorldSettings":
        """A test-sized world: seconds on a CPU; checks the pipeline, not the quality figures."""
        return cls(seed=seed, subjects=4, styles=4, test_subjects=2, test_styles=2, subject_images=3,
                   lora=LoraTrainSettings(rank=2, steps=4, batch=4, lr=5e-3), subject_lora=None, judge_steps=20, judge_batch=32, judge_eval=100,
                   hypernet=HypernetSettings(steps=3, hidden=16, pairs_per_step=1, dev_subjects=1, dev_styles=1),
                   base=BaseSettings(steps=4, batch=8), base_config=BaseConfig.tiny())

    def world_key(self) -> str:
        """What the world's subjects, styles, split and training images depend on."""
        return cache.key(self.seed, self.subjects, self.styles, self.test_subjects, self.test_styles,
                         self.subject_images)

    def base_key(self) -> str:
        return cache.key(asdict(self.base_config), asdict(self.base))

    def lora_key(self) -> str:
        return cache.key(self.base_key(), asdict(self.lora))

    def subject_lora_key(self) -> str:
        return self.lora_key() if self.subject_lora is None else cache.key(self.base_key(), asdict(self.subject_lora))

    def loras_key(self) -> str:
        """Both kinds of LoRA (what H's training data depends on)."""
        return self.lora_key() if self.subject_lora is None else cache.key(self.lora_key(), self.subject_lora_key())

    def judges_key(self) -> str:
        return cache.key(self.judge_steps, self.judge_batch, self.judge_blur)

    def hypernet_key(self) -> str:
        # settings added after the first worlds were built enter the key only when changed, so
        # an H built before they existed is still found
        default = asdict(HypernetSettings())
        h = {k: v for k, v in asdict(self.hypernet).items() if k in _FIRST_HYPERNET_FIELDS or v != default[k]}
        return cache.key(self.loras_key(), h)


@dataclass
class BuiltWorld:
    folder: Path
    world: W.World
    settings: WorldSettings
    base_path: Path
    info: dict

    @property
    def lora_dir(self) -> Path:
        """The style LoRAs (and the subject LoRAs when they share the style LoRAs' settings)."""
        return self.folder / f"loras-{self.settings.lora_key()}"

    @property
    def subject_lora_dir(self) -> Path:
        return self.folder / f"loras-{self.settings.subject_lora_key()}"

    def lora_path(self, name: str) -> Path:
        subject = any(s.name == name for s in self.world.subjects)
        return (self.subject_lora_dir if subject else self.lora_dir) / f"{name}.safetensors"

    @property
    def judges_path(self) -> Path:
        return self.folder / f"judges-{self.settings.judges_key()}.safetensors"

    @property
    def hypernet_path(self) -> Path:
        return self.folder / f"hypernet-{self.settings.hypernet_key()}" / "hypernet.safetensors"

    def subject_images(self, name: str) -> list[Path]:
        return sorted((self.folder / "images" / "subjects" / name).glob("*.png"))

    def style_image(self, name: str) -> Path:
        return self.folder / "images" / "styles" / f"{name}.png"

    def base(self) -> TestbedBase:
        return TestbedBase.load(self.base_path)


def _base_path(root: Path, config: BaseConfig, settings: BaseSettings) -> Path:
    first = {k: v for k, v in asdict(settings).items() if k in ("steps", "batch", "lr", "seed")}
    parts = [asdict(config), first]
    if settings.more_steps:
        parts.append(asdict(settings))
    return Path(root) / "base" / f"base-{cache.key(*parts)}.safetensors"


def build_base(root: Path, config: BaseConfig, settings: BaseSettings, progress=None) -> tuple[TestbedBase, Path, float]:
    """The pretrained base model (from the cache when it is there). Returns (model, path, seconds spent)."""
    path = _base_path(root, config, settings)
    if path.is_file():
        return TestbedBase.load(path), path, 0.0
    start = time.perf_counter()
    if settings.more_steps:
        model, _, first = build_base(root, config, settings.first_stage(), progress)
        previous = float(model.metadata.get("seconds", "nan")) if not first else first
        losses = pretrain(model, settings.more_steps, settings.batch, settings.more_lr, settings.seed + 1, progress)
        seconds = time.perf_counter() - start - first + previous
    else:
        model = TestbedBase(config, seed=settings.seed)
        losses = pretrain(model, settings.steps, settings.batch, settings.lr, settings.seed, progress)
        seconds = time.perf_counter() - start
    model.save(path, extra={"steps": str(settings.steps + settings.more_steps),
                            "final_loss": f"{np.mean(losses[-50:]):.4f}",
                            "seconds": f"{seconds:.1f}", "threads": str(torch.get_num_threads())})
    return model, path, time.perf_counter() - start


def _save_png(array: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def load_png(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def write_images(folder: Path, world: W.World, per_subject: int) -> None:
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


def lora_examples(model: TestbedBase, images: list[np.ndarray], prompt: str) -> list[tuple[torch.Tensor, dict]]:
    cond = model.encode_prompt(prompt)
    return [(to_latent(uint8_to_image(im[None])), cond) for im in images]


def build_world(settings: WorldSettings, root: Path | None = None, progress=None) -> BuiltWorld:
    """Build (or load from the cache) the world for `settings`. `progress(stage, done, total)`."""
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
    write_images(folder, world, settings.subject_images)
    built = BuiltWorld(folder, world, settings, base_path, {})

    # LoRAs
    t0 = time.perf_counter()
    jobs = [(s.name, [load_png(p) for p in built.subject_images(s.name)], world.subject_prompt(s.name), "subject")
            for s in world.subjects]
    jobs += [(s.name, [load_png(built.style_image(s.name))], world.style_prompt(s.name, world.style_object(s.name)[0].cls),
              "style") for s in world.styles]
    for index, (name, images, prompt, kind) in enumerate(jobs):
        path = built.lora_path(name)
        if not path.is_file():
            kind_settings = settings.subject_lora if kind == "subject" and settings.subject_lora else settings.lora
            lora_settings = LoraTrainSettings(**{**asdict(kind_settings), "seed": kind_settings.seed + index,
                                                 "target": settings.base_config.lora_target})
            factors, losses = train_lora(model.unet, model.denoise, model.schedule,
                                         lora_examples(model, images, prompt), lora_settings)
            save_kohya(factors, path, {"lorarar_testbed.kind": kind, "lorarar_testbed.prompt": prompt,
                                       "lorarar_testbed.world_seed": str(world.seed),
                                       "lorarar_testbed.final_loss": f"{np.mean(losses[-10:]):.4f}",
                                       "lorarar_testbed.note": "LoRA for the LoRA.rar testbed base model, not SDXL"})
        say("loras", index + 1, len(jobs))
    timings["loras"] = round(time.perf_counter() - t0, 1)

    # judges
    t0 = time.perf_counter()
    if not built.judges_path.is_file():
        from .judges import train_judges

        judges = train_judges(world, settings.judge_steps, settings.judge_batch, seed=settings.seed,
                              eval_images=settings.judge_eval, blur_fraction=settings.judge_blur,
                              progress=lambda d, n, loss: say("judges", d, n))
        judges.save(built.judges_path)
    timings["judges"] = round(time.perf_counter() - t0, 1)

    # hypernetwork
    t0 = time.perf_counter()
    if not built.hypernet_path.is_file():
        train_hypernet(built, model, lambda d, n: say("hypernet", d, n))
    timings["hypernet"] = round(time.perf_counter() - t0, 1)
    timings["total"] = round(time.perf_counter() - start, 1)

    from .judges import Judges

    info_path = built.hypernet_path.parent / "build.json"
    previous = json.loads(info_path.read_text()) if info_path.is_file() else {}
    timings["base_pretraining_once"] = float(TestbedBase.load(base_path).metadata.get("seconds", "nan"))
    info = {"settings": asdict(settings), "world_seed": world.seed, "base": str(base_path),
            "judges_accuracy": Judges.load(built.judges_path).accuracy,
            "timings_this_run_s": timings,
            "timings_first_build_s": previous.get("timings_first_build_s") or timings,
            "threads": torch.get_num_threads()}
    info_path.write_text(json.dumps(info, indent=1, default=str))
    built.info = info
    return built


def _index(name: str) -> int:
    """sks12 → 12: manifests list subjects and styles in world order."""
    return int("".join(ch for ch in name if ch.isdigit()) or 0)


def dev_split(world: W.World, settings: HypernetSettings) -> tuple[list[str], list[str]]:
    """H's validation subjects and styles: drawn from the training side of the world (never the
    test pairs), both sides unseen in H's training, the way the test split is built."""
    train_subjects, train_styles = world.train_subjects, world.train_styles
    rng = np.random.default_rng(W._seed("dev-split", world.seed))
    dev_subjects = sorted(rng.choice(train_subjects, min(settings.dev_subjects, len(train_subjects) - 1),
                                     replace=False).tolist())
    dev_styles = sorted(rng.choice(train_styles, min(settings.dev_styles, len(train_styles) - 1), replace=False).tolist())
    return dev_subjects, dev_styles


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
                       amp="off", name=f"lorarar-testbed-seed{built.world.seed}", license="same as this package")
    if s.init not in ("default", "sum"):
        raise ValueError(f"hypernetwork init must be 'default' or 'sum', not {s.init!r}")
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
