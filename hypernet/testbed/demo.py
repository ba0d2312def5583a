"""The demo: merge two bundled testbed LoRAs with the bundled testbed hypernetwork, offline, in seconds.

`weights/testbed/` holds only what it needs (written by `python -m hypernet testbed bundle`):
the base model (float16), one subject LoRA and one style LoRA of a held-out pair (neither was
seen when H was trained), that pair's reference LoRA (trained on its ground-truth renders), the
testbed hypernetwork, the judges and `demo.json` (world seed and sizes, pair, prompt, and the rule
the pair was picked by). Everything else is rebuilt deterministically by `python -m hypernet
testbed build`.

Which held-out pair is bundled is not picked by hand: `pick_pair` takes the verdict benchmark's
per-pair joint accuracies and returns the pair at the median of (lorarar − sum), ties broken by
the sum's joint accuracy nearest its median, then by pair order — a typical pair, neither the
hypernetwork's best case nor its worst.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from . import world as W


def bundle_dir() -> Path:
    """weights/testbed of the pack (a checkout, or hypernet/weights/testbed in a wheel)."""
    from ..catalog import PACK_WEIGHTS_DIR

    return PACK_WEIGHTS_DIR / "testbed"


PICK_RULE = ("the held-out pair at the median of lorarar − sum (joint accuracy per pair, verdict benchmark), "
             "ties broken by the sum's joint accuracy nearest its median, then by pair order")


def pick_pair(report: dict) -> tuple[str, str]:
    """The demo pair of a bench report (`PICK_RULE`)."""
    rows = {r["method"]: r for r in report["rows"]}
    pairs = [tuple(p) for p in report["pairs"]]
    lorarar, summed = (np.array(rows[m]["joint_per_pair"]) for m in ("lorarar", "sum"))
    diff = lorarar - summed
    median_diff, median_sum = np.median(diff), np.median(summed)
    order = sorted(range(len(pairs)), key=lambda i: (abs(diff[i] - median_diff), abs(summed[i] - median_sum), i))
    return pairs[order[0]]


def bundle(built, pair: tuple[str, str], dest: Path | None = None, rule: str = "") -> Path:
    from safetensors.torch import save_file

    from ..safetensors_io import load_safetensors
    from .base import TestbedBase

    dest = Path(dest or bundle_dir())
    dest.mkdir(parents=True, exist_ok=True)
    for old in dest.glob("*.safetensors"):
        old.unlink()
    subject, style = pair
    TestbedBase.load(built.base_path).save(dest / "base.safetensors", dtype=torch.float16,
                                           extra={"source": built.base_path.name})
    shutil.copy(built.lora_path(subject), dest / f"{subject}.safetensors")
    shutil.copy(built.lora_path(style), dest / f"{style}.safetensors")
    shutil.copy(built.reference_path(subject, style), dest / "reference.safetensors")
    shutil.copy(built.hypernet_path, dest / "hypernet.safetensors")
    tensors, meta = load_safetensors(built.judges_path)  # float16 halves the largest file of the bundle
    save_file({k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in tensors.items()},
              str(dest / "judges.safetensors"), meta)
    w = built.world
    info = {"world_seed": w.seed, "subjects": len(w.subjects), "styles": len(w.styles),
            "test_subjects": len(w.test_subjects), "test_styles": len(w.test_styles),
            "subject": subject, "style": style, "class": w.subject(subject).cls, "regime": w.regime(style),
            "prompt": w.pair_prompt(subject, style), "held_out_pair": list(pair) in [list(p) for p in w.test_pairs],
            "picked_by": rule or "given by hand (--pair)",
            "note": "LoRA.rar testbed files (a 32x32 toy world), not SDXL; rebuilt by `python -m hypernet testbed build`"}
    (dest / "demo.json").write_text(json.dumps(info, indent=1))
    return dest


def run_demo(out: Path, bundle: Path | None = None, images: int = 4, steps: int = 20, seed: int = 0,
             force: bool = False) -> dict:
    from ..lora import read_lora
    from ..merge import merge
    from ..model import load_hypernet
    from ..nodelogic.plot import block_means, coefficient_plot
    from ..safetensors_io import sha256_file
    from ..writer import merge_metadata, save_merged
    from .base import TestbedBase
    from .bench import lora_deltas, merged_patches, static_patches
    from .figures import labelled_grid
    from .judges import Judges

    start = time.perf_counter()
    src = Path(bundle or bundle_dir())
    info = json.loads((src / "demo.json").read_text())
    out = Path(out)
    targets = [out / n for n in ("demo.png", "coefficients.png", "merged_lorarar.safetensors", "verdicts.json")]
    existing = [p for p in targets if p.exists()]
    if existing and not force:
        from ..errors import OutputExistsError

        raise OutputExistsError(f"{existing[0]} already exists; refusing to overwrite it (use --force)")
    out.mkdir(parents=True, exist_ok=True)
    model = TestbedBase.load(src / "base.safetensors")
    subject, style = info["subject"], info["style"]
    content_path, style_path = src / f"{subject}.safetensors", src / f"{style}.safetensors"
    content, style_lora = read_lora(content_path), read_lora(style_path)
    hypernet = load_hypernet(src / "hypernet.safetensors")
    judges = Judges.load(src / "judges.safetensors")
    t0 = time.perf_counter()
    merged = merge(content, style_lora, hypernet, method="lorarar")
    merge_seconds = time.perf_counter() - t0
    summed = merge(content, style_lora, None, method="sum")
    noise = torch.randn((images, 12, W.SIZE // 2, W.SIZE // 2), generator=torch.Generator().manual_seed(seed))
    prompts = [info["prompt"]] * images
    rows = {
        "content LoRA only": static_patches(lora_deltas(content)),
        "style LoRA only": static_patches(lora_deltas(style_lora)),
        "sum": merged_patches(summed)[0],
        "lorarar (testbed H)": merged_patches(merged)[0],
    }
    if (src / "reference.safetensors").is_file():
        rows["reference (trained on the pair)"] = static_patches(lora_deltas(read_lora(src / "reference.safetensors")))
    samples = {name: model.sample(prompts, noise, steps, patches) for name, patches in rows.items()}
    world = W.World.create(info["world_seed"], info["subjects"], info["styles"], info["test_subjects"],
                           info["test_styles"])
    rng = np.random.default_rng(W._seed("demo-truth", seed))
    truth = W.render_batch([(world.subject(subject), world.style(style), W.Pose.random(rng)) for _ in range(images)])
    all_rows = {"ground truth (renderer)": truth, **samples}
    verdicts = {}
    for name, imgs in all_rows.items():
        judged = judges.judge(imgs, world)
        verdicts[name] = {"content": sum(v.subject == subject for v in judged) / images,
                          "style": sum(v.style == style for v in judged) / images,
                          "joint": sum(v.subject == subject and v.style == style for v in judged) / images,
                          "images": [v.to_json() for v in judged]}
    labels = [f"{n}  (judges: content {v['content']:.0%}, style {v['style']:.0%}, joint {v['joint']:.0%})"
              for n, v in verdicts.items()]
    grid = labelled_grid(list(all_rows.values()), labels, [f"seed {seed}:{k}" for k in range(images)], scale=4,
                         title=f'"{info["prompt"]}"  (testbed world {info["world_seed"]}; 32x32 toy images, not SDXL)')
    grid.save(out / "demo.png")
    means = block_means(merged.coefficients)
    coefficient_plot(means, "testbed H coefficients (mean per transformer block)",
                     f"{subject} (content) + {style} (style), held-out pair").save(out / "coefficients.png")
    metadata = merge_metadata(merged, hypernet_name=hypernet.config.name,
                              hypernet_sha256=sha256_file(src / "hypernet.safetensors"),
                              content_sha256=sha256_file(content_path), style_sha256=sha256_file(style_path),
                              content_name=content_path.name, style_name=style_path.name)
    metadata["ss_base_model_version"] = "lorarar_testbed"
    metadata["modelspec.architecture"] = "lorarar-testbed/lora"
    save_merged(merged, out / "merged_lorarar.safetensors", metadata, force=force)
    result = {"pair": [subject, style], "prompt": info["prompt"], "regime": info.get("regime"),
              "picked_by": info.get("picked_by"), "verdicts": verdicts,
              "merge_seconds": merge_seconds, "seconds": time.perf_counter() - start,
              "files": [str(p) for p in targets]}
    tmp = out / "verdicts.json.tmp"
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(out / "verdicts.json")
    return result
