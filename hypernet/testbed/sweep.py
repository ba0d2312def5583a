"""Experiments behind docs/testbed.md's "why does H not beat the sum" section (issue 11).

Everything here is measured on H's **validation split** — training-side subjects and styles held
out of H's training (`HypernetSettings.dev_subjects` × `dev_styles`, both sides unseen, built the
way the test split is) — never on the 25 test pairs, which only `bench` looks at.

    python -m hypernet.testbed.sweep hypernet --out sweep/   # H: hidden, steps, pairs, λ, wd, init, #LoRAs
    python -m hypernet.testbed.sweep objective --out sweep/  # ZipLoRA steps/lr, strengths, prompts vs judges

Each finished configuration is appended to `<out>/<experiment>.jsonl` and skipped when the
command is run again, so a long sweep can be interrupted and resumed.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from ..lora import LoraFile, read_lora
from . import world as W
from .base import to_latent, uint8_to_image
from .bench import ObjectiveProbe, lora_deltas, merged_patches, static_patches
from .build import BuiltWorld, HypernetSettings, WorldSettings, build_world, dev_split, load_png, train_hypernet

log = logging.getLogger(__name__)


@dataclass
class EvalSettings:
    images: int = 8              # per pair and row
    sampling_steps: int = 20
    objective_draws: int = 8
    seed: int = 1                # not the benchmark's seed 0: other noise than the test rows
    guidance: float = 1.0        # classifier-free guidance scale when sampling (1: none)


class PairEvaluator:
    """Samples and judges merges of a fixed list of pairs, and measures the objective's terms on
    fixed draws; every row sees the same noise."""

    def __init__(self, built: BuiltWorld, pairs: list[tuple[str, str]], settings: EvalSettings | None = None):
        self.built, self.pairs = built, list(pairs)
        self.settings = s = settings or EvalSettings()
        self.model = built.base()
        self.judges = built.judges()
        w = built.world
        self.items = []
        for pi, (subject, style) in enumerate(self.pairs):
            content, style_lora = read_lora(built.lora_path(subject)), read_lora(built.lora_path(style))
            subject_images = [load_png(p) for p in built.subject_images(subject)]
            style_image = load_png(built.style_image(style))
            style_cls = w.style_object(style)[0].cls
            subject_prompt, style_prompt = w.subject_prompt(subject), w.style_prompt(style, style_cls)
            c_deltas, s_deltas = lora_deltas(content), lora_deltas(style_lora)
            probe = ObjectiveProbe(self.model, subject_images, style_image, subject_prompt, style_prompt, c_deltas,
                                   s_deltas, s.objective_draws, s.seed * 7 + pi)
            noise = torch.randn((s.images, 12, W.SIZE // 2, W.SIZE // 2),
                                generator=torch.Generator().manual_seed(s.seed * 100_003 + pi))
            examples_s = [(to_latent(uint8_to_image(im[None])), self.model.encode_prompt(subject_prompt))
                          for im in subject_images]
            examples_t = [(to_latent(uint8_to_image(style_image[None])), self.model.encode_prompt(style_prompt))]
            self.items.append({"subject": subject, "style": style, "content": content, "style_lora": style_lora,
                               "c_deltas": c_deltas, "s_deltas": s_deltas, "probe": probe, "noise": noise,
                               "prompt": w.pair_prompt(subject, style), "subject_prompt": subject_prompt,
                               "examples_s": examples_s, "examples_t": examples_t})

    def score(self, make: Callable[[dict], object], prompt: Callable[[dict], str] | None = None,
              judge: bool = True) -> dict:
        """`make(item)` gives a MergedLora or a {layer: ΔW} dict for one pair; `prompt(item)` the
        sampling prompt (default: the pair prompt, as the benchmark samples)."""
        per = {"content": [], "style": [], "joint": [], "objective_content": [], "objective_style": []}
        seconds = 0.0
        for item in self.items:
            t0 = time.perf_counter()
            made = make(item)
            seconds += time.perf_counter() - t0
            if isinstance(made, dict):
                deltas, patches = made, static_patches(made)
            else:
                patches, deltas = merged_patches(made)
            oc, os_ = item["probe"].terms(deltas)
            per["objective_content"].append(oc)
            per["objective_style"].append(os_)
            if judge:
                text = prompt(item) if prompt else item["prompt"]
                images = self.model.sample([text] * self.settings.images, item["noise"], self.settings.sampling_steps,
                                           patches, guidance=self.settings.guidance)
                subj, sty = self.judges.classify(images, self.built.world)
                c_ok = np.array([p == item["subject"] for p in subj])
                s_ok = np.array([p == item["style"] for p in sty])
                per["content"].append(float(c_ok.mean()))
                per["style"].append(float(s_ok.mean()))
                per["joint"].append(float((c_ok & s_ok).mean()))
        out = {k: (float(np.mean(v)) if v else None) for k, v in per.items()}
        out["objective_mse"] = out["objective_content"] + out["objective_style"]
        out["joint_per_pair"] = per["joint"]
        out["merge_seconds_per_pair"] = seconds / len(self.items)
        return out


# ---------------------------------------------------------------------------------------------
# ZipLoRA with snapshots (the same loop and random stream as training/ziplora.py)

def ziplora_snapshots(built: BuiltWorld, model, content: LoraFile, style: LoraFile, examples_s, examples_t,
                      at: tuple[int, ...], lr: float = 0.01, seed: int = 0) -> dict[int, object]:
    from ..merged import assemble
    from ..model import DEFAULT_TARGETS
    from ..training.injection import LoraInjection
    from ..training.objective import LAMBDA, Sample, draw_noise, ziplora_objective

    generator = torch.Generator().manual_seed(seed)
    out = {}
    with LoraInjection(model.unet, content, style, DEFAULT_TARGETS, device="cpu") as injection:
        params = {name: (torch.ones(w, requires_grad=True), torch.ones(w, requires_grad=True))
                  for name, w in injection.target_widths().items()}
        optimizer = torch.optim.Adam([p for pair in params.values() for p in pair], lr=lr)
        for step in range(max(at)):
            subject = examples_s[int(torch.randint(len(examples_s), (1,), generator=generator))]
            style_ex = examples_t[int(torch.randint(len(examples_t), (1,), generator=generator))]
            sample = Sample(subject[0], subject[1], style_ex[0], style_ex[1])
            t, noise = draw_noise(tuple(sample.subject_latent.shape), generator, model.schedule.num_timesteps)
            optimizer.zero_grad(set_to_none=True)
            with torch.enable_grad():
                terms = ziplora_objective(injection, model.denoise, model.schedule, sample, params, t, noise, LAMBDA)
                terms.total.backward()
            optimizer.step()
            if step + 1 in at:
                coefficients = {n: (a.detach().clone(), b.detach().clone()) for n, (a, b) in params.items()}
                out[step + 1] = assemble(content, style, coefficients, method="ziplora")
    return out


def coefficient_stats(merged) -> dict:
    values = [torch.cat([merged.coefficients[n][0], merged.coefficients[n][1]]) for n in merged.coefficients]
    if not values:
        return {}
    v = torch.cat(values)
    return {"m_mean": float(v.mean()), "m_std": float(v.std()), "m_neg_share": float((v < 0).float().mean())}


# ---------------------------------------------------------------------------------------------
# Experiments

def _done(path: Path) -> dict[str, dict]:
    if not path.is_file():
        return {}
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {r["name"]: r for r in records}


def _append(path: Path, record: dict) -> None:
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")
    log.info("%s", json.dumps({k: v for k, v in record.items() if not isinstance(v, (list, dict))}))


def validation_pairs(built: BuiltWorld, settings: HypernetSettings) -> list[tuple[str, str]]:
    subjects, styles = dev_split(built.world, settings)
    return [(a, b) for a in subjects for b in styles]


def hypernet_configs() -> list[tuple[str, dict]]:
    """The sweep of issue 11: each entry changes one thing against the base configuration (the
    settings the world's H is built with); every run validates every 50 steps and keeps its best
    checkpoint (early stopping on the validation split)."""
    base = {"steps": 200, "hidden": 128, "lr": 0.01, "lam": 0.01, "pairs_per_step": 2, "weight_decay": 1e-4,
            "init": "default"}
    rows = [("base", {"steps": 300}), ("init sum", {"init": "sum", "steps": 300})]
    rows += [(f"hidden {h}", {"hidden": h}) for h in (16, 32)]
    rows += [("pairs/step 4", {"pairs_per_step": 4, "steps": 100}), ("lambda 0.1", {"lam": 0.1}),
             ("weight decay 0.1", {"weight_decay": 0.1})]
    rows += [(f"train LoRAs {a}x{b}", {"train_subjects": a, "train_styles": b}) for a, b in ((4, 3), (8, 5))]
    return [(name, {**base, **change}) for name, change in rows]


def run_hypernet_sweep(built: BuiltWorld, out: Path, only: list[str] | None = None,
                       evaluation: EvalSettings | None = None, dev: tuple[int, int] = (3, 3),
                       configs: list[tuple[str, dict]] | None = None) -> list[dict]:
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "hypernet.jsonl"
    done = _done(results_path)
    base_h = replace(built.settings.hypernet, dev_subjects=dev[0], dev_styles=dev[1])
    val = validation_pairs(built, base_h)
    evaluator = PairEvaluator(built, val, evaluation)
    # a few training pairs, to see how much of what H learns is memorised
    from ..merge import merge
    from ..model import load_hypernet

    if "sum" not in done:
        record = {"name": "sum", **evaluator.score(lambda it: merge(it["content"], it["style_lora"], None, method="sum"))}
        _append(results_path, record)
        done["sum"] = record
    for name, config in configs if configs is not None else hypernet_configs():
        if name in done or (only and name not in only):
            continue
        hs = replace(base_h, **config, validate_every=50, validation_draws=2, early_stop=True)
        folder = out / "hypernets" / name.replace(" ", "_").replace(",", "").replace("/", "-")
        t0 = time.perf_counter()
        if hs == built.settings.hypernet and built.hypernet_path.is_file():
            path = built.hypernet_path  # the world's own H is this configuration: no need to train it again
            seconds = float(built.info.get("timings_first_build_s", {}).get("hypernet", "nan"))
        else:
            path = train_hypernet(built, built.base(), settings=hs, out=folder / "hypernet.safetensors")
            seconds = time.perf_counter() - t0
        h = load_hypernet(path)
        train_pairs = json.loads(h.config.extra["train_pairs"])
        rng = np.random.default_rng(0)
        seen = [tuple(train_pairs[i]) for i in rng.choice(len(train_pairs), min(6, len(train_pairs)), replace=False)]
        scored = evaluator.score(lambda it, h=h: merge(it["content"], it["style_lora"], h, method="lorarar"))
        seen_eval = PairEvaluator(built, seen, replace(evaluator.settings, images=1))
        seen_h = seen_eval.score(lambda it, h=h: merge(it["content"], it["style_lora"], h, method="lorarar"), judge=False)
        seen_sum = seen_eval.score(lambda it: merge(it["content"], it["style_lora"], None, method="sum"), judge=False)
        one = merge(evaluator.items[0]["content"], evaluator.items[0]["style_lora"], h, method="lorarar")
        record = {"name": name, "config": {**asdict(hs)}, "train_seconds": round(seconds, 1),
                  "train_pairs": len(train_pairs), "chosen_step": int(h.config.extra["chosen_step"]),
                  "validation_curve": json.loads(h.config.extra["validation_curve"]), **scored,
                  "seen_objective_mse_h": seen_h["objective_mse"], "seen_objective_mse_sum": seen_sum["objective_mse"],
                  **coefficient_stats(one)}
        _append(results_path, record)
    return list(_done(results_path).values())


def run_objective_sweep(built: BuiltWorld, out: Path, evaluation: EvalSettings | None = None,
                        dev: tuple[int, int] = (3, 3)) -> list[dict]:
    """Does lowering the ZipLoRA objective raise the judges' accuracies? ZipLoRA at several steps
    and learning rates; the sum at other strengths; content/style only with their own prompts."""
    from ..merge import merge

    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "objective.jsonl"
    done = _done(results_path)
    val = validation_pairs(built, replace(built.settings.hypernet, dev_subjects=dev[0], dev_styles=dev[1]))
    ev = PairEvaluator(built, val, evaluation)

    def row(name, make, prompt=None, **extra):
        if name not in done:
            record = {"name": name, **ev.score(make, prompt), **extra}
            _append(results_path, record)
            done[name] = record

    row("content only", lambda it: it["c_deltas"])
    row("content only, its own prompt (a sksN <class>)", lambda it: it["c_deltas"], lambda it: it["subject_prompt"])
    row("style only", lambda it: it["s_deltas"])
    row("sum", lambda it: merge(it["content"], it["style_lora"], None, method="sum"))
    for cs, ss in ((0.8, 0.8), (1.0, 0.8), (0.8, 1.0), (1.2, 0.8), (1.0, 0.6)):
        row(f"sum, strengths {cs}/{ss}",
            lambda it, cs=cs, ss=ss: merge(it["content"], it["style_lora"], None, cs, ss, method="sum"))
    for lr, at in ((0.01, (50, 100, 300)), (0.03, (50, 100))):
        name = f"ziplora lr {lr}"
        if all(f"{name}, {n} steps" in done for n in at):
            continue
        snaps_per_pair = []
        t0 = time.perf_counter()
        for pi, it in enumerate(ev.items):
            snaps_per_pair.append(ziplora_snapshots(built, ev.model, it["content"], it["style_lora"], it["examples_s"],
                                                    it["examples_t"], at, lr=lr, seed=pi))
        seconds = time.perf_counter() - t0
        index = {id(it): pi for pi, it in enumerate(ev.items)}
        for n in at:
            row(f"{name}, {n} steps", lambda it, n=n, snaps=snaps_per_pair, index=index: snaps[index[id(it)]][n],
                ziplora_seconds_per_pair=round(seconds / len(ev.items), 1), ziplora_steps_run=max(at))
    return list(done.values())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m hypernet.testbed.sweep", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("experiment", choices=("hypernet", "objective"))
    p.add_argument("--out", required=True)
    p.add_argument("--world-seed", type=int, default=0)
    p.add_argument("--subjects", type=int, default=20)
    p.add_argument("--styles", type=int, default=24)
    p.add_argument("--only", nargs="*", default=None, help="hypernet: only these configurations (names)")
    p.add_argument("--images", type=int, default=8)
    p.add_argument("--cache", default=None)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(1)
    settings = WorldSettings(seed=args.world_seed, subjects=args.subjects, styles=args.styles)
    built = build_world(settings, Path(args.cache) if args.cache else None)
    evaluation = EvalSettings(images=args.images)
    out = Path(args.out)
    if args.experiment == "hypernet":
        run_hypernet_sweep(built, out, args.only, evaluation)
    else:
        run_objective_sweep(built, out, evaluation)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
