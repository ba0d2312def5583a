"""The testbed: world determinism, a tiny world end to end (LoRA files that inspect/merge read,
the benchmark's outputs), the bundled judges' accuracy, the judge server agreeing with direct
classification through `python -m hypernet judge`, and the demo."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from hypernet.testbed import world as W

ROOT = Path(__file__).resolve().parents[1]
BUNDLE = ROOT / "weights" / "testbed"
needs_bundle = pytest.mark.skipif(not (BUNDLE / "demo.json").is_file(), reason="weights/testbed not bundled")


def _cli(*args, cwd=ROOT, check=True):
    proc = subprocess.run([sys.executable, "-m", "hypernet", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc


# -- the world -----------------------------------------------------------------------------------

def test_world_is_deterministic_and_seeds_differ():
    a, b, c = W.World.create(3, 20, 16), W.World.create(3, 20, 16), W.World.create(4, 20, 16)
    assert a.to_json() == b.to_json()
    assert a.to_json()["subjects"] != c.to_json()["subjects"]
    assert a.to_json()["styles"] != c.to_json()["styles"]
    pose = W.Pose(0.1, -0.05, 0.9, 0.2, 7)
    assert np.array_equal(W.render(a.subjects[0], a.styles[0], pose), W.render(b.subjects[0], b.styles[0], pose))
    assert len(a.test_pairs) == 25 and not set(a.test_subjects) & set(a.train_subjects)


def test_world_sizes_and_distinct_identities():
    w = W.World.create(0, 24, 18, 4, 3)
    assert len(w.subjects) == 24 and len(w.styles) == 18 and len(w.test_pairs) == 12
    assert len({(s.cls, s.marking) for s in w.subjects}) == 24  # identity survives recolouring styles
    for i, x in enumerate(w.styles):
        assert sum(f != g for f, g in zip(x.signature, W.PLAIN.signature)) >= 2
        for y in w.styles[i + 1:]:
            assert sum(f != g for f, g in zip(x.signature, y.signature)) >= 2
    assert any(s.conflicts for s in w.styles)
    with pytest.raises(ValueError):
        W.World.create(0, 40, 16)


def test_render_any_subject_in_any_style():
    w = W.World.create(1, 8, 6, 2, 2)
    rng = np.random.default_rng(0)
    for subject in w.subjects:
        for style in [W.PLAIN, *w.styles]:
            image = W.render(subject, style, W.Pose.random(rng))
            assert image.shape == (32, 32, 3) and image.dtype == np.uint8
    plain = W.render(w.subjects[0], W.PLAIN, W.Pose())
    assert not np.array_equal(plain, W.render(w.subjects[0], w.styles[0], W.Pose()))
    assert not np.array_equal(plain, W.render(w.subjects[1], W.PLAIN, W.Pose()))


# -- a tiny world end to end ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from hypernet.testbed.build import WorldSettings, build_world

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("testbed")
    return build_world(WorldSettings.tiny(), root)


def test_tiny_world_builds_and_is_cached(tiny):
    from hypernet.lora import read_lora
    from hypernet.model import load_hypernet
    from hypernet.testbed.build import build_world

    w = tiny.world
    for s in w.subjects + w.styles:
        lora = read_lora(tiny.lora_path(s.name))
        assert lora.unet_layers and all(layer.rank == tiny.settings.lora.rank for layer in lora.layers.values())
    h = load_hypernet(tiny.hypernet_path)
    assert h.config.base_family == "lorarar-testbed"
    assert json.loads(h.config.extra["test_pairs_never_seen"]) == [list(p) for p in w.test_pairs]
    trained = {tuple(p) for p in json.loads(h.config.extra["train_pairs"])}
    assert trained and not trained & set(w.test_pairs)
    assert "NOT an SDXL" in h.config.extra["for"] and h.config.extra["world_seed"] == str(w.seed)
    again = build_world(tiny.settings, tiny.folder.parents[1])
    assert again.info["timings_this_run_s"]["loras"] < 5 and again.hypernet_path == tiny.hypernet_path


def test_tiny_loras_work_with_inspect_and_merge(tiny, tmp_path):
    content, style = tiny.world.test_pairs[0]
    proc = _cli("inspect", str(tiny.lora_path(content)))
    assert "transformer" in proc.stdout.lower() or "layers" in proc.stdout.lower()
    out = tmp_path / "sum.safetensors"
    _cli("merge", str(tiny.lora_path(content)), str(tiny.lora_path(style)), "-o", str(out), "--method", "sum")
    out2 = tmp_path / "rar.safetensors"
    _cli("merge", str(tiny.lora_path(content)), str(tiny.lora_path(style)), "-o", str(out2),
         "--hypernet", str(tiny.hypernet_path))
    from hypernet.lora import read_lora

    merged = read_lora(out2)
    c = read_lora(tiny.lora_path(content))
    assert set(merged.unet_layers) == set(c.unet_layers)


def test_tiny_bench_writes_every_row(tiny, tmp_path):
    from hypernet.merge import METHODS
    from hypernet.testbed.bench import BenchSettings, method_rows, run_bench

    report = run_bench(tiny, BenchSettings(images=2, sampling_steps=2, ziplora_steps=1, objective_draws=2,
                                           bootstrap=50), tmp_path)
    rows = [r["method"] for r in report["rows"]]
    assert rows == method_rows()
    assert rows[:5] == ["content only", "style only", "sum", "lorarar", "ziplora"] and rows[-1] == "oracle"
    assert set(METHODS) <= set(rows)
    for r in report["rows"]:
        assert not r["errors"], r
        assert r["images"] == 2 * len(tiny.world.test_pairs)
        assert 0 <= r["joint"] <= min(r["content"], r["style"]) + 1e-9
    sum_row = next(r for r in report["rows"] if r["method"] == "sum")
    assert sum_row["objective_content"] > 0 and sum_row["objective_style"] > 0
    assert next(r for r in report["rows"] if r["method"] == "content only")["objective_content"] == 0
    for name in ("bench.json", "bench.md", "table.png", "samples.png"):
        assert (tmp_path / name).is_file()
    assert json.loads((tmp_path / "bench.json").read_text())["rows"][0]["method"] == "content only"
    assert (tmp_path / "generated" / "lorarar").is_dir()


def test_sampler_applies_progress_dependent_merges(tiny):
    """A merge whose weights depend on sampling progress is re-patched during sampling."""
    from hypernet.testbed.bench import merged_patches

    class Switching:
        layers = {"x": None}

        def delta(self, name):
            return torch.zeros(1)

        def delta_at(self, name, p):
            return torch.full((1,), 0.0 if p < 0.5 else 1.0)

    patches, _ = merged_patches(Switching())
    assert patches(0.0) is not None and patches(0.25) is None and patches(0.5) is not None


# -- judges ------------------------------------------------------------------------------------

@needs_bundle
def test_bundled_judges_are_accurate_on_held_out_renders():
    from hypernet.testbed.judges import Judges

    info = json.loads((BUNDLE / "demo.json").read_text())
    judges = Judges.load(BUNDLE / "judges.safetensors")
    assert judges.accuracy["subject"] >= 0.95 and judges.accuracy["style"] >= 0.95
    w = W.World.create(info["world_seed"], info["subjects"], info["styles"])
    rng = np.random.default_rng(12345)  # poses never used in training
    items = [(w.subjects[int(rng.integers(len(w.subjects)))], w.styles[int(rng.integers(len(w.styles)))],
              W.Pose.random(rng)) for _ in range(300)]
    subjects, styles = judges.classify(W.render_batch(items))
    assert np.mean([p == s.name for p, (s, _, _) in zip(subjects, items)]) >= 0.93
    assert np.mean([p == t.name for p, (_, t, _) in zip(styles, items)]) >= 0.93


@needs_bundle
def test_judge_cli_through_classifier_server_matches_direct_classification(tmp_path):
    """`python -m hypernet judge` against the loopback classifier server gives the same accuracies
    as classifying the images directly (right and wrong subjects and styles mixed)."""
    from PIL import Image

    from hypernet.testbed.judge_check import direct_accuracies
    from hypernet.testbed.judge_server import ClassifierJudgeServer
    from hypernet.testbed.judges import Judges

    info = json.loads((BUNDLE / "demo.json").read_text())
    w = W.World.create(info["world_seed"], info["subjects"], info["styles"])
    judges = Judges.load(BUNDLE / "judges.safetensors")
    rng = np.random.default_rng(7)
    pairs = w.test_pairs[:4]
    gen, refs = tmp_path / "generated", tmp_path / "references"
    for mi, method in enumerate(("good", "mixed")):
        for subject, style in pairs:
            d = gen / method / f"{subject}__{style}"
            d.mkdir(parents=True)
            for k in range(4):
                s = w.subject(subject) if mi == 0 or k % 2 else w.subjects[int(rng.integers(len(w.subjects)))]
                t = w.style(style) if mi == 0 or k < 2 else w.styles[int(rng.integers(len(w.styles)))]
                Image.fromarray(W.render(s, t, W.Pose.random(rng))).save(d / f"{k}.png")
    for subject in {p[0] for p in pairs}:
        d = refs / "subjects" / subject
        d.mkdir(parents=True)
        for k in range(3):
            Image.fromarray(W.render(w.subject(subject), W.PLAIN, W.Pose.random(rng))).save(d / f"{k}.png")
    (refs / "styles").mkdir(parents=True)
    for style in {p[1] for p in pairs}:
        obj, pose = w.style_object(style)
        Image.fromarray(W.render(obj, w.style(style), pose)).save(refs / "styles" / f"{style}.png")
    with ClassifierJudgeServer(judges) as server:
        proc = _cli("judge", "--generated", str(gen), "--references", str(refs), "--out", str(tmp_path / "out"),
                    "--url", server.url, "--model", "testbed", "--no-cache")
    via = {r["method"]: r for r in json.loads(proc.stdout)["by_method"]}
    direct = direct_accuracies(judges, gen)
    assert set(via) == {"good", "mixed"}
    for method, d in direct.items():
        for aspect in ("content", "style", "joint"):
            assert via[method][f"{aspect}_accuracy"] == pytest.approx(d[aspect]), (method, aspect)
    assert direct["mixed"]["joint"] < direct["good"]["joint"]
    assert server.requests == 2 * len(pairs) * 4 * (3 + 1)


# -- the bundled files and the demo ----------------------------------------------------------

@needs_bundle
def test_bundle_is_small_and_says_what_it_is():
    from hypernet.catalog import find_checkpoint
    from hypernet.errors import HypernetError
    from hypernet.model import load_hypernet

    total = sum(p.stat().st_size for p in BUNDLE.iterdir() if p.is_file())
    assert total <= 10 * 1024 * 1024
    h = load_hypernet(BUNDLE / "hypernet.safetensors")
    assert h.config.base_family == "lorarar-testbed" and "NOT an SDXL" in h.config.extra["for"]
    assert {"world_seed", "train_pairs", "steps"} <= set(h.config.extra)
    assert not set(h.widths) & {640, 1280}
    with pytest.raises(HypernetError):
        find_checkpoint("hypernet.safetensors")  # not a catalog name: never offered as SDXL


@needs_bundle
def test_demo_runs_offline_and_refuses_to_overwrite(tmp_path):
    out = tmp_path / "demo"
    proc = _cli("demo", "--output", str(out), "--images", "2", "--steps", "6")
    for name in ("demo.png", "coefficients.png", "merged_lorarar.safetensors", "verdicts.json"):
        assert (out / name).is_file(), name
    verdicts = json.loads((out / "verdicts.json").read_text())["verdicts"]
    assert set(verdicts) == {"ground truth (renderer)", "content LoRA only", "style LoRA only", "sum",
                             "lorarar (testbed H)"}
    assert "lorarar (testbed H)" in proc.stdout
    from hypernet.lora import read_lora

    assert read_lora(out / "merged_lorarar.safetensors").unet_layers
    again = _cli("demo", "--output", str(out), check=False)
    assert again.returncode == 1 and "--force" in again.stderr
    _cli("demo", "--output", str(out), "--force", "--images", "1", "--steps", "2")
