"""The testbed benchmark: every merge method on the held-out pairs, judged against ground truth.

For each of the test pairs (subjects and styles both unseen by the testbed hypernetwork; half the
styles of each regime, `world.REGIMES`) and each row — content LoRA only, style LoRA only, sum,
lorarar (testbed H; one row per hypernetwork given), ziplora (per pair, 100 steps), every other
method in `hypernet.merge.METHODS`, the per-pair reference (a LoRA trained on ground-truth renders
of that pair) and the oracle (ground-truth renders) — N images are sampled from the same noise
(seeds fixed per pair and image, shared by all rows) with the pair prompt "a sksN <class> in styM
style", and judged (`judges.py`): content right when the subject verdict is the pair's subject,
style right when the style verdict is its style, joint when both (the paper's measure). Intervals
are 95% bootstrap intervals over pairs (images of one pair are not independent), overall and per
style regime. The ZipLoRA objective's two terms are measured on fixed noise draws, the same for
every row; merge wall time is per pair. For every hypernetwork row, how much H's output depends on
its input (`diagnostics.py`: |W1·x| / |b1|, coefficient spread, distance from H(0)).
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

log = logging.getLogger(__name__)

FIXED_BEFORE = ("content only", "style only", "sum", "lorarar", "ziplora")
FIXED_AFTER = ("reference", "oracle")
# rows that run a library method with other settings than its defaults: row → (method, params).
# NP-LoRA's paper is ambiguous about the side it projects (issue 10): both are measured.
VARIANTS = {"np-lora output side": ("np-lora", {"side": "output"})}


@dataclass
class BenchSettings:
    images: int = 10             # per pair and method (the paper: 10)
    sampling_steps: int = 20
    ziplora_steps: int = 100
    objective_draws: int = 8     # fixed (t, noise) draws for the objective terms
    grid_pairs: int = 3          # pairs per regime shown in samples.png
    bootstrap: int = 2000
    seed: int = 0
    methods: tuple[str, ...] = ()   # empty: all
    guidance: float | None = None   # None: the base's default


def method_rows(hypernet_rows: tuple[str, ...] = ("lorarar",)) -> list[str]:
    """Rows of the table: the fixed ones (one lorarar row per hypernetwork), every other library
    method, the reference and the oracle."""
    from .. import merge as merge_module

    rows = []
    for r in FIXED_BEFORE:
        rows += list(hypernet_rows) if r == "lorarar" else [r]
    for m in merge_module.METHODS:
        if m not in FIXED_BEFORE:
            rows.append(m)
            rows += [variant for variant, (method, _) in VARIANTS.items() if method == m]
    return rows + list(FIXED_AFTER)


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


def _ziplora(model, world, built, content, style_lora, subject, style, steps, seed):
    from ..training.ziplora import ZipLoraSettings, ziplora_merge

    style_cls = world.style_object(style)[0].cls
    examples_s = [(to_latent(uint8_to_image(load_png(p)[None])), model.encode_prompt(world.subject_prompt(subject)))
                  for p in built.subject_images(subject)]
    examples_t = [(to_latent(uint8_to_image(load_png(built.style_image(style))[None])),
                   model.encode_prompt(world.style_prompt(style, style_cls)))]
    return ziplora_merge(model.unet, model.denoise, model.schedule, content, style_lora, examples_s, examples_t,
                         ZipLoraSettings(steps=steps, seed=seed), device="cpu").merged


def run_bench(built: BuiltWorld, settings: BenchSettings, out: Path, hypernets: dict[str, Path] | None = None,
              pairs: list[tuple[str, str]] | None = None, progress=None) -> dict:
    """The table for `pairs` (default: the world's held-out test pairs). `hypernets`: row name →
    hypernetwork file (default: {"lorarar": the world's testbed H})."""
    from ..merge import merge
    from ..model import load_hypernet
    from .diagnostics import input_dependence

    say = progress or (lambda stage, done, total: None)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    world = built.world
    model = built.base()
    if settings.guidance is not None:
        model.guidance = settings.guidance
    judges = built.judges()
    hypernet_files = hypernets or {"lorarar": built.hypernet_path}
    if settings.methods:  # only the hypernetworks of the rows asked for: gate 4's rows need none, and
        # the world's hypernetwork may not be trained yet when it runs
        hypernet_files = {row: path for row, path in hypernet_files.items() if row in settings.methods}
    loaded = {row: load_hypernet(path) for row, path in hypernet_files.items()}
    rows = [r for r in method_rows(tuple(loaded)) if not settings.methods or r in settings.methods]
    test_pairs = [tuple(p) for p in world.test_pairs]
    pairs = list(pairs or test_pairs)
    held_out = all(tuple(p) in test_pairs for p in pairs)
    regimes = [world.regime(style) for _, style in pairs]
    if "reference" in rows and not all(built.reference_path(*p).is_file() for p in pairs):
        rows.remove("reference")   # references are trained for the test and gate pairs only
        log.info("no reference row: not every pair has a reference LoRA")
    n = settings.images
    results: dict[str, dict] = {r: {"content": [], "style": [], "joint": [], "merge_seconds": [], "objective": [],
                                    "errors": [], "pairs": [], "diagnostics": []} for r in rows}
    samples: dict[tuple[str, int], np.ndarray] = {}
    verdicts: dict[str, dict] = {r: {} for r in rows}
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
                t0 = time.perf_counter()
                if row == "oracle":
                    rng = np.random.default_rng(W._seed("oracle", world.seed, settings.seed, pi))
                    images = W.render_batch([(world.subject(subject), world.style(style), W.Pose.random(rng))
                                             for _ in range(n)])
                    record["merge_seconds"].append(0.0)
                else:
                    if row in ("content only", "style only", "reference"):
                        if row == "reference":
                            deltas = lora_deltas(read_lora(built.reference_path(subject, style)))
                        else:
                            deltas = c_deltas if row == "content only" else s_deltas
                        patches = static_patches(deltas)
                    else:
                        if row == "ziplora":
                            merged = _ziplora(model, world, built, content, style_lora, subject, style,
                                              settings.ziplora_steps, settings.seed + pi)
                        elif row in loaded:
                            merged = merge(content, style_lora, loaded[row], method="lorarar")
                            record["diagnostics"].append(input_dependence(merged))
                        else:
                            method, params = VARIANTS.get(row, (row, None))
                            merged = merge(content, style_lora, None, method=method, params=params)
                        patches, deltas = merged_patches(merged)
                    record["merge_seconds"].append(time.perf_counter() - t0)
                    images = model.sample([prompt] * n, noise, settings.sampling_steps, patches)
                    record["objective"].append(probe.terms(deltas))
                judged = judges.judge(images, world)
                c_ok = np.array([v.subject == subject for v in judged])
                s_ok = np.array([v.style == style for v in judged])
                record["content"].append(c_ok.tolist())
                record["style"].append(s_ok.tolist())
                record["joint"].append((c_ok & s_ok).tolist())
                record["pairs"].append(pi)
                verdicts[row][pair_key(subject, style)] = [v.to_json() for v in judged]
                samples[(row, pi)] = images
            except Exception as exc:  # a method that fails must not sink the benchmark: record it
                log.exception("method %s failed on %s × %s", row, subject, style)
                record["errors"].append(f"{subject}__{style}: {type(exc).__name__}: {exc}")
        say("pairs", pi + 1, len(pairs))
    seconds = time.perf_counter() - start
    table = summarise(results, rows, regimes, settings)
    report = {"settings": asdict(settings), "world_seed": world.seed, "pairs": pairs, "regimes": regimes,
              # what the tables call the pairs: the verdict's held-out pairs or pairs of training LoRAs
              "pairs_kind": "held-out" if held_out else "training-side",
              "rows": table, "judges_thresholds": judges.thresholds,
              "hypernets": {row: str(path) for row, path in hypernet_files.items()},
              "hypernet_train_pairs": {row: len(json.loads(h.config.extra.get("train_pairs", "[]")))
                                       for row, h in loaded.items()},
              "guidance": model.guidance, "wall_seconds": round(seconds, 1), "threads": torch.get_num_threads(),
              "date": time.strftime("%Y-%m-%d"), "world_folder": str(built.folder)}
    lr = next((r for r in table if r["method"] == "lorarar"), None)
    zl = next((r for r in table if r["method"] == "ziplora"), None)
    if lr and zl and lr["merge_seconds"]:
        report["ziplora_over_lorarar_time"] = zl["merge_seconds"] / lr["merge_seconds"]
    (out / "bench.json").write_text(json.dumps(report, indent=1))
    (out / "verdicts.json").write_text(json.dumps(verdicts))
    (out / "bench.md").write_text(markdown_table(report))
    (out / "readme_table.md").write_text(readme_table(report))
    from .figures import grid_indices, sample_grid, table_image

    table_image(report).save(out / "table.png")
    shown = grid_indices(regimes, settings.grid_pairs)
    sample_grid(samples, rows, [pairs[i] for i in shown], 2, shown, [regimes[i] for i in shown]).save(out / "samples.png")
    save_generated(out / "generated", samples, rows, pairs)
    return report


def pair_key(subject: str, style: str) -> str:
    return f"{subject}__{style}"


def _aggregate(r: dict, mask: np.ndarray, settings: BenchSettings) -> dict:
    entry = {}
    for aspect in ("content", "style", "joint"):
        per_pair = np.array([np.mean(v) for v, keep in zip(r[aspect], mask) if keep])
        entry[aspect] = float(per_pair.mean()) if len(per_pair) else None
        entry[f"{aspect}_ci"] = bootstrap_interval(per_pair, settings.bootstrap, settings.seed) if len(per_pair) else None
        entry[f"{aspect}_per_pair"] = per_pair.tolist()
    entry["pairs"] = int(mask.sum())
    return entry


def summarise(results: dict, rows: list[str], regimes: list[str], settings: BenchSettings) -> list[dict]:
    table = []
    for row in rows:
        r = results[row]
        pair_regimes = np.array([regimes[i] for i in r["pairs"]])
        entry = {"method": row, "errors": r["errors"],
                 **_aggregate(r, np.ones(len(pair_regimes), bool), settings),
                 "by_regime": {g: _aggregate(r, pair_regimes == g, settings) for g in W.REGIMES if (pair_regimes == g).any()}}
        entry["images"] = sum(len(v) for v in r["joint"])
        objective = np.array(r["objective"]) if r["objective"] else None
        entry["objective_content"] = float(objective[:, 0].mean()) if objective is not None else None
        entry["objective_style"] = float(objective[:, 1].mean()) if objective is not None else None
        entry["merge_seconds"] = float(np.mean(r["merge_seconds"])) if r["merge_seconds"] else None
        if r["diagnostics"]:
            from .diagnostics import average

            entry["diagnostics"] = average(r["diagnostics"])
        table.append(entry)
    return table


def markdown_table(report: dict) -> str:
    """The verdict as markdown: one table per style regime (joint = the paper's measure), then the
    objective and merge time, then H's input dependence."""
    lines = []
    regimes = [g for g in W.REGIMES if g in set(report["regimes"])]
    for regime in regimes:
        count = sum(r == regime for r in report["regimes"])
        lines += [f"**{regime} styles** ({count} {report.get('pairs_kind', 'held-out')} pairs × {report['settings']['images']} images)", "",
                  "| method | content % [95% CI] | style % [95% CI] | joint % [95% CI] |", "|---|---|---|---|"]
        for r in report["rows"]:
            g = r["by_regime"].get(regime)
            if g is None:
                continue
            err = f" ({len(r['errors'])} errors)" if r["errors"] else ""
            lines.append(f"| {r['method']}{err} | {percent(g['content'], g['content_ci'])} | "
                         f"{percent(g['style'], g['style_ci'])} | {percent(g['joint'], g['joint_ci'])} |")
        lines.append("")
    lines += ["**all pairs**", "", "| method | joint % [95% CI] | objective: content MSE | objective: style MSE | merge s/pair |",
              "|---|---|---|---|---|"]
    for r in report["rows"]:
        obj_c = "–" if r["objective_content"] is None else f"{r['objective_content']:.4f}"
        obj_s = "–" if r["objective_style"] is None else f"{r['objective_style']:.4f}"
        sec = "–" if r["merge_seconds"] is None or r["method"] == "oracle" else (
            f"{r['merge_seconds']:.3f}" if r["merge_seconds"] < 10 else f"{r['merge_seconds']:.1f}")
        lines.append(f"| {r['method']} | {percent(r['joint'], r['joint_ci'])} | {obj_c} | {obj_s} | {sec} |")
    diag = [(r["method"], r["diagnostics"]) for r in report["rows"] if r.get("diagnostics")]
    if diag:
        lines += ["", "**H's input dependence** (mean over pairs; per attention width)", "",
                  "| row | width | ‖W1·x‖/‖b1‖ | H(0) = (m_c, m_s) | m_c mean ± std | m_s mean ± std | input effect ‖M − M0‖/‖S‖ | ‖M − S‖/‖S‖ | m_c < 0 |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for method, d in diag:
            for width, x in d.items():
                lines.append(f"| {method} | {width} | {x['input_over_bias']:.3f} | ({x['h0_c']:+.2f}, {x['h0_s']:+.2f}) | "
                             f"{x['m_c_mean']:+.2f} ± {x['m_c_std']:.2f} | {x['m_s_mean']:+.2f} ± {x['m_s_std']:.2f} | "
                             f"{x['input_effect']:.3f} | {x['distance_from_sum']:.3f} | {100 * x['negative_m_c']:.0f}% |")
    return "\n".join(lines) + "\n"


README_ROWS = {"content only": "subject LoRA only", "style only": "style LoRA only", "sum": "`sum`",
               "lorarar": "`lorarar` (testbed H)", "lorarar normalised": "`lorarar`, H on normalised columns",
               "ziplora": "ZipLoRA (per pair)", "np-lora": "`np-lora`", "np-lora output side": "`np-lora`, output side",
               "k-lora": "`k-lora`", "reference": "reference (LoRA trained on the pair)", "oracle": "oracle (renderer)"}


def readme_table(report: dict) -> str:
    """README's table: joint accuracy per style regime with its interval, subject/style kept over
    all pairs, merge time — every figure from `report` (one bench run)."""
    regimes = [g for g in W.REGIMES if g in set(report["regimes"])]
    lines = ["| method | " + " | ".join(f"**both** % [95% CI], {g} styles" for g in regimes)
             + " | subject kept | style kept | merge time per pair |",
             "|---|" + "---|" * (len(regimes) + 3)]
    for r in report["rows"]:
        sec = r["merge_seconds"]
        time_text = "–" if sec is None or r["method"] in ("oracle", "content only", "style only", "reference") else (
            f"{1000 * sec:.0f} ms" if sec < 1 else f"{sec:.1f} s")
        cells = [percent(r["by_regime"][g]["joint"], r["by_regime"][g]["joint_ci"]) if g in r["by_regime"] else "–"
                 for g in regimes]
        lines.append(f"| {README_ROWS.get(r['method'], r['method'])} | " + " | ".join(cells)
                     + f" | {100 * r['content']:.0f}% | {100 * r['style']:.0f}% | {time_text} |")
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
