"""The testbed benchmark: every merge method on the held-out pairs, judged against ground truth.

For each of the test pairs (subjects and styles both unseen by the testbed hypernetwork) and
each row — content LoRA only, style LoRA only, sum, lorarar (testbed H), ziplora (per pair,
100 steps), every other method in `hypernet.merge.METHODS`, and the oracle (ground-truth
renders) — N images are sampled from the same noise (seeds fixed per pair and image, shared by
all methods) with the pair prompt "a sksN <class> in styM style", and judged: content correct
when the subject classifier names the pair's subject, style correct when the style classifier
names its style, joint when both (the paper's measure). Intervals are 95% bootstrap intervals
over pairs (images of one pair are not independent). The ZipLoRA objective's two terms are
measured on fixed noise draws, the same for every method. Merge wall time is per pair.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..lora import LoraFile, read_lora
from . import world as W
from .base import TestbedBase, WeightPatch, to_latent, uint8_to_image
from .build import BuiltWorld, load_png
from .figures import percent
from .judges import Judges

log = logging.getLogger(__name__)

FIXED_BEFORE = ("content only", "style only", "sum", "lorarar", "ziplora")
# rows that run a library method with other settings than its defaults: row → (method, params).
# NP-LoRA's paper is ambiguous about the side it projects (issue 10): both are measured.
VARIANTS = {"np-lora output side": ("np-lora", {"side": "output"})}


@dataclass
class BenchSettings:
    images: int = 10             # per pair and method (the paper: 10)
    sampling_steps: int = 20
    ziplora_steps: int = 100
    objective_draws: int = 8     # fixed (t, noise) draws for the objective terms
    grid_pairs: int = 5
    bootstrap: int = 2000
    seed: int = 0
    methods: tuple[str, ...] = ()   # empty: all


def method_rows() -> list[str]:
    """Rows of the table: the fixed ones, every other library method, the oracle."""
    from .. import merge as merge_module

    rows = list(FIXED_BEFORE)
    for m in merge_module.METHODS:
        if m not in rows:
            rows.append(m)
            rows += [variant for variant, (method, _) in VARIANTS.items() if method == m]
    return rows + ["oracle"]


def lora_deltas(lora: LoraFile, strength: float = 1.0) -> dict[str, torch.Tensor]:
    return {name: layer.delta().float() * strength for name, layer in lora.unet_layers.items()}


def merged_patches(merged):
    """patches(p) for a MergedLora: static ones once, progress-dependent ones (delta_at) per step."""
    delta_at = getattr(merged, "delta_at", None)
    static = {name: merged.delta(name).float() for name in merged.layers}
    if delta_at is None:
        state = {"done": False}

        def patches(p):
            if state["done"]:
                return None
            state["done"] = True
            return static
        return patches, static
    cache: dict = {}

    def dynamic(p):
        deltas = {name: delta_at(name, p).float() for name in merged.layers}
        key = tuple(float(d.abs().sum()) for d in deltas.values())
        if cache.get("key") == key:
            return None
        cache["key"] = key
        return deltas
    return dynamic, static


def static_patches(deltas):
    state = {"done": False}

    def patches(p):
        if state["done"]:
            return None
        state["done"] = True
        return deltas
    return patches


def bootstrap_interval(per_pair: np.ndarray, n: int, seed: int) -> tuple[float, float]:
    """95% interval of the mean of per-pair accuracies, resampling pairs."""
    if len(per_pair) == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = per_pair[rng.integers(0, len(per_pair), (n, len(per_pair)))].mean(axis=1)
    return float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))


class ObjectiveProbe:
    """The ZipLoRA objective's two terms on fixed draws for one pair."""

    def __init__(self, model: TestbedBase, subject_images: list[np.ndarray], style_image: np.ndarray,
                 subject_prompt: str, style_prompt: str, content: dict, style: dict, draws: int, seed: int):
        self.model = model
        gen = torch.Generator().manual_seed(seed)
        ac = model.schedule.alphas_cumprod.float()
        subj = to_latent(uint8_to_image(np.stack(subject_images)))
        sty = to_latent(uint8_to_image(style_image[None]))
        idx = torch.randint(len(subject_images), (draws,), generator=gen)
        self.t = torch.randint(0, len(ac), (draws,), generator=gen)
        noise = torch.randn((draws, *subj.shape[1:]), generator=gen)
        a = ac[self.t].reshape(-1, 1, 1, 1)
        self.x_subject = a.sqrt() * subj[idx] + (1 - a).sqrt() * noise
        self.x_style = a.sqrt() * sty.expand(draws, -1, -1, -1) + (1 - a).sqrt() * noise
        self.c_subject = model.contexts([subject_prompt] * draws)
        self.c_style = model.contexts([style_prompt] * draws)
        self.target_subject = self._run(content, self.x_subject, self.c_subject)
        self.target_style = self._run(style, self.x_style, self.c_style)

    @torch.no_grad()
    def _run(self, deltas, x, c):
        with WeightPatch(self.model.unet) as patch:
            patch.set(deltas)
            return self.model.unet(x, self.t.float(), context=c)

    def terms(self, deltas: dict) -> tuple[float, float]:
        subj = self._run(deltas, self.x_subject, self.c_subject)
        sty = self._run(deltas, self.x_style, self.c_style)
        return float(F.mse_loss(subj, self.target_subject)), float(F.mse_loss(sty, self.target_style))


def run_bench(built: BuiltWorld, settings: BenchSettings, out: Path, hypernet_path: Path | None = None,
              progress=None) -> dict:
    from ..merge import merge
    from ..model import load_hypernet
    from ..training.ziplora import ZipLoraSettings, ziplora_merge

    say = progress or (lambda stage, done, total: None)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    world = built.world
    model = built.base()
    judges = Judges.load(built.judges_path)
    hypernet = load_hypernet(hypernet_path or built.hypernet_path)
    rows = [r for r in method_rows() if not settings.methods or r in settings.methods]
    pairs = world.test_pairs
    n = settings.images
    results: dict[str, dict] = {r: {"content": [], "style": [], "joint": [], "merge_seconds": [], "objective": [],
                                    "errors": []} for r in rows}
    samples: dict[tuple[str, int], np.ndarray] = {}
    start = time.perf_counter()
    for pi, (subject, style) in enumerate(pairs):
        content, style_lora = read_lora(built.lora_path(subject)), read_lora(built.lora_path(style))
        subject_images = [load_png(p) for p in built.subject_images(subject)]
        style_image = load_png(built.style_image(style))
        style_cls = world.style_object(style)[0].cls
        prompt = world.pair_prompt(subject, style)
        gen = torch.Generator().manual_seed(settings.seed * 100_003 + pi)
        noise = torch.randn((n, 12, W.SIZE // 2, W.SIZE // 2), generator=gen)
        c_deltas, s_deltas = lora_deltas(content), lora_deltas(style_lora)
        probe = ObjectiveProbe(model, subject_images, style_image, world.subject_prompt(subject),
                               world.style_prompt(style, style_cls), c_deltas, s_deltas,
                               settings.objective_draws, settings.seed * 7 + pi)
        for row in rows:
            record = results[row]
            try:
                deltas = None
                if row == "oracle":
                    rng = np.random.default_rng(W._seed("oracle", world.seed, settings.seed, pi))
                    images = W.render_batch([(world.subject(subject), world.style(style), W.Pose.random(rng))
                                             for _ in range(n)])
                    record["merge_seconds"].append(0.0)
                else:
                    if row == "content only":
                        t0 = time.perf_counter()
                        deltas = c_deltas
                        patches = static_patches(deltas)
                    elif row == "style only":
                        t0 = time.perf_counter()
                        deltas = s_deltas
                        patches = static_patches(deltas)
                    else:
                        t0 = time.perf_counter()
                        if row == "ziplora":
                            examples_s = [(to_latent(uint8_to_image(im[None])), model.encode_prompt(
                                world.subject_prompt(subject))) for im in subject_images]
                            examples_t = [(to_latent(uint8_to_image(style_image[None])), model.encode_prompt(
                                world.style_prompt(style, style_cls)))]
                            merged = ziplora_merge(model.unet, model.denoise, model.schedule, content, style_lora,
                                                   examples_s, examples_t,
                                                   ZipLoraSettings(steps=settings.ziplora_steps, seed=settings.seed + pi),
                                                   device="cpu").merged
                        else:
                            method, params = VARIANTS.get(row, (row, None))
                            merged = merge(content, style_lora, hypernet if row == "lorarar" else None,
                                           method=method, params=params)
                        patches, deltas = merged_patches(merged)
                    record["merge_seconds"].append(time.perf_counter() - t0)
                    images = model.sample([prompt] * n, noise, settings.sampling_steps, patches)
                    record["objective"].append(probe.terms(deltas))
                subj_pred, style_pred = judges.classify(images)
                c_ok = np.array([p == subject for p in subj_pred])
                s_ok = np.array([p == style for p in style_pred])
                record["content"].append(c_ok.tolist())
                record["style"].append(s_ok.tolist())
                record["joint"].append((c_ok & s_ok).tolist())
                samples[(row, pi)] = images
            except Exception as exc:  # a method that fails must not sink the benchmark: record it
                log.exception("method %s failed on %s × %s", row, subject, style)
                record["errors"].append(f"{subject}__{style}: {type(exc).__name__}: {exc}")
        say("pairs", pi + 1, len(pairs))
    seconds = time.perf_counter() - start
    table = summarise(results, rows, settings)
    report = {"settings": asdict(settings), "world_seed": world.seed, "pairs": pairs, "rows": table,
              "judges_accuracy": judges.accuracy, "hypernet": str(hypernet_path or built.hypernet_path),
              "hypernet_train_pairs": len(json.loads(hypernet.config.extra.get("train_pairs", "[]"))),
              "wall_seconds": round(seconds, 1), "threads": torch.get_num_threads(),
              "date": time.strftime("%Y-%m-%d"), "world_folder": str(built.folder)}
    lr = next((r for r in table if r["method"] == "lorarar"), None)
    zl = next((r for r in table if r["method"] == "ziplora"), None)
    if lr and zl and lr["merge_seconds"]:
        report["ziplora_over_lorarar_time"] = zl["merge_seconds"] / lr["merge_seconds"]
    (out / "bench.json").write_text(json.dumps(report, indent=1))
    (out / "bench.md").write_text(markdown_table(report))
    from .figures import sample_grid, table_image

    table_image(report).save(out / "table.png")
    sample_grid(samples, rows, pairs[: settings.grid_pairs], n_show=2).save(out / "samples.png")
    save_generated(out / "generated", samples, rows, pairs)
    return report


def summarise(results: dict, rows: list[str], settings: BenchSettings) -> list[dict]:
    table = []
    for row in rows:
        r = results[row]
        entry = {"method": row, "errors": r["errors"]}
        for aspect in ("content", "style", "joint"):
            per_pair = np.array([np.mean(v) for v in r[aspect]]) if r[aspect] else np.array([])
            entry[aspect] = float(per_pair.mean()) if len(per_pair) else None
            entry[f"{aspect}_ci"] = bootstrap_interval(per_pair, settings.bootstrap, settings.seed) if len(per_pair) else None
            entry[f"{aspect}_per_pair"] = per_pair.tolist()
        entry["images"] = sum(len(v) for v in r["joint"])
        objective = np.array(r["objective"]) if r["objective"] else None
        entry["objective_content"] = float(objective[:, 0].mean()) if objective is not None else None
        entry["objective_style"] = float(objective[:, 1].mean()) if objective is not None else None
        entry["merge_seconds"] = float(np.mean(r["merge_seconds"])) if r["merge_seconds"] else None
        table.append(entry)
    return table




def markdown_table(report: dict) -> str:
    lines = ["| method | content % [95% CI] | style % [95% CI] | joint % [95% CI] | objective: content MSE | objective: style MSE | merge s/pair |",
             "|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        obj_c = "–" if r["objective_content"] is None else f"{r['objective_content']:.4f}"
        obj_s = "–" if r["objective_style"] is None else f"{r['objective_style']:.4f}"
        sec = "–" if r["merge_seconds"] is None or r["method"] == "oracle" else (
            f"{r['merge_seconds']:.3f}" if r["merge_seconds"] < 10 else f"{r['merge_seconds']:.1f}")
        err = f" ({len(r['errors'])} errors)" if r["errors"] else ""
        lines.append(f"| {r['method']}{err} | {percent(r['content'], r['content_ci'])} | {percent(r['style'], r['style_ci'])} | "
                     f"{percent(r['joint'], r['joint_ci'])} | {obj_c} | {obj_s} | {sec} |")
    return "\n".join(lines) + "\n"


def save_generated(folder: Path, samples: dict, rows: list[str], pairs: list[tuple[str, str]]) -> None:
    """The judge's layout (`generated/<method>/<subject>__<style>/*.png`) for `python -m hypernet judge`."""
    from PIL import Image

    for (row, pi), images in samples.items():
        subject, style = pairs[pi]
        d = folder / row.replace(" ", "_") / f"{subject}__{style}"
        d.mkdir(parents=True, exist_ok=True)
        for k, im in enumerate(images):
            Image.fromarray(im).save(d / f"{k:03d}.png")


def write_references(built: BuiltWorld, folder: Path, pairs: list[tuple[str, str]]) -> Path:
    """references/subjects/<subject>/*.png (the subject LoRA's training renders) and
    references/styles/<style>.png (the style LoRA's one image)."""
    import shutil

    for subject in sorted({p[0] for p in pairs}):
        d = folder / "subjects" / subject
        d.mkdir(parents=True, exist_ok=True)
        for path in built.subject_images(subject):
            shutil.copy(path, d / path.name)
    (folder / "styles").mkdir(parents=True, exist_ok=True)
    for style in sorted({p[1] for p in pairs}):
        shutil.copy(built.style_image(style), folder / "styles" / f"{style}.png")
    return folder
