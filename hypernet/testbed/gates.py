"""The four gates of issue 18: each stage of the world is measured before the next is trusted.

    python -m hypernet testbed gate judges     # 1: judges on held-out renders and the decoy suite
    python -m hypernet testbed gate base       # 2: the base's samples for described prompts
    python -m hypernet testbed gate loras      # 3: each LoRA alone
    python -m hypernet testbed gate headroom   # 4: sum vs each LoRA alone vs a per-pair reference vs
                                               #    the oracle, per style regime, on training-side pairs

Each prints its figures and whether it passes; none of them looks at the held-out test pairs
(gate 4 runs on pairs of training subjects and styles, so the world is never tuned on the pairs
the verdict is measured on).
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict

import numpy as np
import torch

from . import world as W
from .decoys import IMITATES_ANY, KINDS, false_subject_rate, make_decoys
from .judges import HEADS, SUBJECT_HEADS, Judges, perturb

log = logging.getLogger(__name__)

GATE1 = {"renders": 0.97, "decoys": 0.05}
GATE2 = 0.90
GATE3 = {"median": 0.90, "name_below": 0.70}


def _attribute_accuracy(verdicts, truths: list[dict]) -> dict[str, float]:
    return {h: float(np.mean([v.attributes[h] == t[h] for v, t in zip(verdicts, truths)])) for h in HEADS}


def _truth(subject: W.Subject, style: W.Style) -> dict:
    return {**dict(zip(SUBJECT_HEADS, subject.attributes)), **{f: getattr(style, f) for f in W.FEATURES}}


def gate_judges(world: W.World, judges: Judges, renders: int = 2000, decoys: int = 200, seed: int = 0) -> dict:
    """Gate 1. Held-out ground truth: every world subject in every world style (and plain) at poses
    from a stream never used in training or calibration, clean and perturbed. Decoys: each kind of
    `decoys.KINDS`, `decoys` images each; the false "this is the subject" rate per kind."""
    start = time.perf_counter()
    rng = np.random.default_rng(W._seed("gate1", world.seed, seed))
    styles = [W.PLAIN, *world.styles]
    items = [(world.subjects[int(rng.integers(len(world.subjects)))], styles[int(rng.integers(len(styles)))],
              W.Pose.random(rng)) for _ in range(renders)]
    images = W.render_batch(items)
    result: dict = {"held_out_renders": renders}
    for label, batch in (("clean", images), ("perturbed", perturb(images, rng))):
        verdicts = judges.judge(batch, world)
        result[label] = {
            "subject": float(np.mean([v.subject == s.name for v, (s, _, _) in zip(verdicts, items)])),
            "style": float(np.mean([v.style == t.name for v, (_, t, _) in zip(verdicts, items)])),
            "both": float(np.mean([v.subject == s.name and v.style == t.name for v, (s, t, _) in zip(verdicts, items)])),
            "refused": float(np.mean([not v.recognisable for v in verdicts])),
            "attributes": _attribute_accuracy(verdicts, [_truth(s, t) for s, t, _ in items]),
        }
    result["decoys"] = {}
    for kind in KINDS:
        imgs, imitated = make_decoys(world, kind, decoys, seed)
        verdicts = judges.judge(imgs, world)
        result["decoys"][kind] = {
            "false_subject": false_subject_rate([v.subject for v in verdicts], imitated, world),
            "refused": float(np.mean([not v.recognisable for v in verdicts])),
            "counts_as": "any world subject" if kind in IMITATES_ANY else "the subject it imitates"}
    worst = max(d["false_subject"] for d in result["decoys"].values())
    clean = result["clean"]
    result["pass"] = bool(clean["subject"] >= GATE1["renders"] and clean["style"] >= GATE1["renders"]
                          and worst <= GATE1["decoys"])
    result["thresholds"] = judges.thresholds
    result["seconds"] = round(time.perf_counter() - start, 1)
    return result


def _per_attribute(x: dict) -> str:
    return ", ".join(f"{h} {100 * a:.1f}" for h, a in x["attributes"].items())


def print_gate_judges(r: dict) -> str:
    thresholds = r["thresholds"].get("subject_residual", {})
    lines = [f"gate 1 — judges ({r['held_out_renders']} held-out renders of the world's subjects in its styles and plain; "
             "subject residual thresholds " + ", ".join(f"{g} {t:.3f}" for g, t in thresholds.items()) + ")"]
    for label in ("clean", "perturbed"):
        x = r[label]
        lines.append(f"  {label:9s}: subject {100 * x['subject']:.1f}%  style {100 * x['style']:.1f}%  both "
                     f"{100 * x['both']:.1f}%  refused {100 * x['refused']:.1f}%")
        lines.append("             per attribute: " + _per_attribute(x))
    lines.append("  decoys (false 'this is the subject' rate; refused = not recognisable):")
    for kind, d in r["decoys"].items():
        lines.append(f"    {kind:28s} {100 * d['false_subject']:5.1f}%   refused {100 * d['refused']:5.1f}%")
    lines.append(f"  gate 1 ({100 * GATE1['renders']:.0f}% on renders, ≤ {100 * GATE1['decoys']:.0f}% per decoy kind): "
                 + ("PASS" if r["pass"] else "FAIL"))
    return "\n".join(lines)


def _seed_noise(n: int, seed: int) -> torch.Tensor:
    return torch.randn((n, 12, W.SIZE // 2, W.SIZE // 2), generator=torch.Generator().manual_seed(seed))


def _attribute_scores(verdicts, truths: list[dict]) -> dict:
    right = np.array([[v.attributes[h] == t[h] for h in HEADS] for v, t in zip(verdicts, truths)])
    return {"attributes": dict(zip(HEADS, map(float, right.mean(0)))), "all_attributes": float(right.all(1).mean()),
            "recognisable": float(np.mean([v.recognisable for v in verdicts])), "images": len(verdicts)}


def gate_base_items(prompts: int = 200, unseen_prompts: int = 60, seed: int = 0) -> dict[str, list]:
    """Gate 2's (subject, style) draws per split: seen compositions, then unseen ones."""
    rng = np.random.default_rng(W._seed("gate2", seed))
    unseen = sorted(W.held_out_compositions())
    out: dict[str, list] = {}
    for split, count in (("seen compositions", prompts), ("unseen compositions", unseen_prompts)):
        items = []
        for _ in range(count):
            if split.startswith("seen"):
                subject = W.generic_subject(rng, set(unseen))
            else:
                cls_, marking, body = unseen[int(rng.integers(len(unseen)))]
                subject = W.Subject("object", cls_, marking, body, ("white", "black")[int(rng.integers(2))])
            items.append((subject, W.generic_style(rng)))
        out[split] = items
    return out


def gate2_prompts(seeds: tuple[int, ...] = (0, 1, 2)) -> set[str]:
    """Every prompt gate 2 draws with these seeds (the judges' sample calibration avoids them)."""
    return {W.describe_prompt(a, b) for seed in seeds for items in gate_base_items(seed=seed).values()
            for a, b in items}


def gate_base(model, judges: Judges, prompts: int = 200, unseen_prompts: int = 60, per_prompt: int = 2,
              steps: int = 20, seed: int = 0) -> dict:
    """Gate 2. Samples of the base for full descriptions ("a red ball with white ring in warm hatched
    style") of random objects in random styles, judged attribute by attribute against what the
    prompt says; compositions of `W.held_out_compositions()` (never seen in pretraining) apart."""
    start = time.perf_counter()
    result: dict = {"guidance": model.guidance, "sampling_steps": steps, "per_prompt": per_prompt}
    for split, items in gate_base_items(prompts, unseen_prompts, seed).items():
        count = len(items)
        prompts_ = [W.describe_prompt(s, t) for s, t in items for _ in range(per_prompt)]
        images = model.sample(prompts_, _seed_noise(len(prompts_), seed * 1009 + len(result)), steps)
        verdicts = judges.judge(images)
        result[split] = _attribute_scores(verdicts, [_truth(s, t) for s, t in items for _ in range(per_prompt)])
        result[split]["prompts"] = count
        if split.startswith("seen"):
            result["examples"] = {"prompts": prompts_[:16], "images": images[:16]}
    seen = result["seen compositions"]["attributes"]
    result["pass"] = bool(min(seen.values()) >= GATE2)
    result["seconds"] = round(time.perf_counter() - start, 1)
    return result


def print_gate_base(r: dict) -> str:
    lines = [f"gate 2 — the base draws (classifier-free guidance {r['guidance']}, {r['sampling_steps']} DDIM steps, "
             f"{r['per_prompt']} images per prompt)"]
    for split in ("seen compositions", "unseen compositions"):
        x = r[split]
        lines.append(f"  {split} ({x['prompts']} prompts, {x['images']} images): every attribute right "
                     f"{100 * x['all_attributes']:.1f}%, recognisable {100 * x['recognisable']:.1f}%")
        lines.append("    per attribute: " + _per_attribute(x))
    lines.append(f"  gate 2 (each attribute ≥ {100 * GATE2:.0f}% on seen compositions): " + ("PASS" if r["pass"] else "FAIL"))
    return "\n".join(lines)


def gate_loras(built, images: int = 12, steps: int = 20, seed: int = 0) -> dict:
    """Gate 3. Each subject LoRA alone with its own prompt ("a sksN <class>"): share of images whose
    subject verdict is that subject; each style LoRA alone with "a <class> in styM style" (the four
    classes in turn): share whose style verdict is that style."""
    from ..lora import read_lora
    from .bench import lora_deltas, static_patches

    start = time.perf_counter()
    world, model, judges = built.world, built.base(), built.judges()
    result: dict = {"images_per_lora": images, "lora_settings": asdict(built.settings.lora),
                    "loras": str(built.lora_dir), "subjects": {}, "styles": {}}
    for k, s in enumerate(world.subjects):
        out = model.sample([world.subject_prompt(s.name)] * images, _seed_noise(images, seed * 7919 + k), steps,
                           static_patches(lora_deltas(read_lora(built.lora_path(s.name)))))
        result["subjects"][s.name] = float(np.mean([v.subject == s.name for v in judges.judge(out, world)]))
    for k, t in enumerate(world.styles):
        prompts = [world.style_prompt(t.name, W.CLASSES[i % len(W.CLASSES)]) for i in range(images)]
        out = model.sample(prompts, _seed_noise(images, seed * 7919 + 500 + k), steps,
                           static_patches(lora_deltas(read_lora(built.lora_path(t.name)))))
        result["styles"][t.name] = float(np.mean([v.style == t.name for v in judges.judge(out, world)]))
    for side in ("subjects", "styles"):
        values = result[side]
        result[f"{side}_median"] = float(np.median(list(values.values())))
        result[f"{side}_below_70"] = sorted((n for n, v in values.items() if v < GATE3["name_below"]),
                                            key=lambda n: values[n])
    result["styles_by_regime_median"] = {g: float(np.median([v for n, v in result["styles"].items()
                                                              if world.regime(n) == g])) for g in W.REGIMES}
    result["pass"] = bool(result["subjects_median"] >= GATE3["median"] and result["styles_median"] >= GATE3["median"])
    result["seconds"] = round(time.perf_counter() - start, 1)
    return result


def print_gate_loras(r: dict) -> str:
    lines = [f"gate 3 — LoRAs alone ({r['images_per_lora']} images each, the LoRA's own prompt)"]
    for side, what in (("subjects", "subject recognised"), ("styles", "style recognised")):
        values = r[side]
        lines.append(f"  {side}: {what} median {100 * r[f'{side}_median']:.0f}% (min {100 * min(values.values()):.0f}%, "
                     f"max {100 * max(values.values()):.0f}%); below 70%: "
                     + (", ".join(f"{n} {100 * values[n]:.0f}%" for n in r[f"{side}_below_70"]) or "none"))
        lines.append("    " + ", ".join(f"{n} {100 * v:.0f}" for n, v in values.items()))
    lines.append("  style LoRAs, median per regime: " + ", ".join(f"{g} {100 * v:.0f}%"
                                                              for g, v in r["styles_by_regime_median"].items()))
    lines.append(f"  gate 3 (median ≥ {100 * GATE3['median']:.0f}% on each side): " + ("PASS" if r["pass"] else "FAIL"))
    return "\n".join(lines)


HEADROOM_ROWS = ("content only", "style only", "sum", "reference", "oracle")


def gate_headroom(built, out, images: int = 10, seed: int = 1) -> dict:
    """Gate 4, on `built.gate_pairs` (training subjects × training styles, per regime; never the
    test pairs). Per regime: does the sum lose what each LoRA alone keeps (sum's joint below both
    alone-sides: its 95% interval entirely under the lower of content-only's content and
    style-only's style), and does a reference trained for the pair close at least half of the gap
    between the sum's joint accuracy and the oracle's?"""
    from .bench import BenchSettings, run_bench

    report = run_bench(built, BenchSettings(images=images, seed=seed, methods=HEADROOM_ROWS, grid_pairs=3), out,
                       pairs=built.gate_pairs)
    return headroom(report)


def headroom(report: dict) -> dict:
    """Gate 4's verdict from a benchmark report that has the `HEADROOM_ROWS`."""
    rows = {r["method"]: r for r in report["rows"]}
    result: dict = {"pairs": report["pairs"], "regimes": {}, "bench": report}
    for regime in W.REGIMES:
        g = {m: rows[m]["by_regime"].get(regime) for m in HEADROOM_ROWS}
        if any(v is None for v in g.values()):
            continue
        alone = min(g["content only"]["content"], g["style only"]["style"])
        s, ref, orc = g["sum"]["joint"], g["reference"]["joint"], g["oracle"]["joint"]
        closed = (ref - s) / (orc - s) if orc > s else float("nan")
        result["regimes"][regime] = {
            "pairs": g["sum"]["pairs"], "content_alone": g["content only"]["content"],
            "style_alone": g["style only"]["style"], "sum_joint": s, "sum_joint_ci": g["sum"]["joint_ci"],
            "reference_joint": ref, "reference_joint_ci": g["reference"]["joint_ci"], "oracle_joint": orc,
            "gap_closed_by_reference": closed,
            "problem_shown": bool(g["sum"]["joint_ci"][1] < alone),
            "headroom": bool(closed >= 0.5)}
    result["pass"] = bool(result["regimes"]) and any(
        x["problem_shown"] and x["headroom"] for x in result["regimes"].values())
    return result


def print_gate_headroom(r: dict) -> str:
    lines = [f"gate 4 — headroom on {len(r['pairs'])} training-side pairs (never the test pairs)"]
    for regime, x in r["regimes"].items():
        lines.append(f"  {regime} ({x['pairs']} pairs): content alone {100 * x['content_alone']:.0f}%, style alone "
                     f"{100 * x['style_alone']:.0f}%; sum joint {100 * x['sum_joint']:.0f}% "
                     f"[{100 * x['sum_joint_ci'][0]:.0f}–{100 * x['sum_joint_ci'][1]:.0f}]; reference joint "
                     f"{100 * x['reference_joint']:.0f}% [{100 * x['reference_joint_ci'][0]:.0f}–"
                     f"{100 * x['reference_joint_ci'][1]:.0f}]; oracle {100 * x['oracle_joint']:.0f}%")
        lines.append(f"    the sum loses what each LoRA alone keeps: {'yes' if x['problem_shown'] else 'no'}; "
                     f"the reference closes {100 * x['gap_closed_by_reference']:.0f}% of the sum→oracle gap: "
                     f"{'yes' if x['headroom'] else 'no'} (≥ 50%)")
    lines.append("  gate 4 (a regime where both hold): " + ("PASS" if r["pass"] else "FAIL"))
    return "\n".join(lines)
