"""The testbed: world determinism, a micro world end to end in seconds (world → LoRA files that
inspect/merge read → H → merge → sampling → judges), the bundled judges' accuracy; marked slow:
the tiny world (cache, CLI, benchmark rows, the sweep tools), the judge server agreeing with
direct classification through `python -m hypernet judge`, and the demo."""

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


# -- a micro world end to end (default run: seconds) --------------------------------------------

def _micro_settings():
    """The smallest world the pipeline runs on: 3 subjects × 3 styles (one test, one validation and
    one training subject/style), a couple of steps per stage. Checks plumbing, not quality."""
    from hypernet.testbed.build import BaseSettings, HypernetSettings, WorldSettings
    from hypernet.training.lora_trainer import LoraTrainSettings

    s = WorldSettings.tiny()
    s.subjects, s.styles, s.test_subjects, s.test_styles, s.subject_images = 3, 3, 1, 1, 2
    s.lora = LoraTrainSettings(rank=2, steps=2, batch=2, lr=5e-3)
    s.judge_steps, s.judge_batch, s.judge_eval = 3, 8, 16
    s.base = BaseSettings(steps=2, batch=4)
    s.hypernet = HypernetSettings(steps=2, hidden=8, pairs_per_step=1, dev_subjects=1, dev_styles=1, init="sum")
    return s


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    from hypernet.testbed.build import build_world

    torch.set_num_threads(1)
    return build_world(_micro_settings(), tmp_path_factory.mktemp("micro"))


def test_pipeline_end_to_end(micro, tmp_path, capsys):
    """world → kohya LoRAs (read by the library and by `inspect`/`merge` in-process) → the testbed H
    (trained on training pairs only) → merge → sampling with the merge applied → judges."""
    from hypernet.cli import main
    from hypernet.lora import read_lora
    from hypernet.merge import merge
    from hypernet.model import load_hypernet
    from hypernet.testbed.bench import merged_patches
    from hypernet.testbed.build import build_world
    from hypernet.testbed.judges import Judges

    w = micro.world
    for s in w.subjects + w.styles:
        lora = read_lora(micro.lora_path(s.name))
        assert lora.unet_layers and all(layer.rank == micro.settings.lora.rank for layer in lora.layers.values())
    h = load_hypernet(micro.hypernet_path)
    assert h.config.base_family == "lorarar-testbed" and "NOT an SDXL" in h.config.extra["for"]
    trained = {tuple(p) for p in json.loads(h.config.extra["train_pairs"])}
    dev = {tuple(p) for p in json.loads(h.config.extra["dev_pairs"])}
    assert trained and dev and not trained & set(w.test_pairs) and not dev & set(w.test_pairs)
    assert not {a for a, _ in trained} & {a for a, _ in dev} and not {b for _, b in trained} & {b for _, b in dev}
    assert json.loads(h.config.extra["test_pairs_never_seen"]) == [list(p) for p in w.test_pairs]

    subject, style = w.test_pairs[0]
    content_path, style_path = micro.lora_path(subject), micro.lora_path(style)
    assert main(["inspect", str(content_path)]) == 0
    assert "layers" in capsys.readouterr().out.lower()
    out = tmp_path / "rar.safetensors"
    assert main(["merge", str(content_path), str(style_path), "-o", str(out), "--hypernet", str(micro.hypernet_path)]) == 0
    assert set(read_lora(out).unet_layers) == set(read_lora(content_path).unet_layers)

    model, judges = micro.base(), Judges.load(micro.judges_path)
    content, style_lora = read_lora(content_path), read_lora(style_path)
    merged, summed = merge(content, style_lora, h, method="lorarar"), merge(content, style_lora, None, method="sum")
    noise = torch.randn((2, 12, 16, 16), generator=torch.Generator().manual_seed(0))
    prompt = [w.pair_prompt(subject, style)] * 2
    images = model.sample(prompt, noise, 2, merged_patches(merged)[0])
    assert images.shape == (2, 32, 32, 3) and images.dtype == np.uint8
    assert not np.array_equal(images, model.sample(prompt, noise, 2, merged_patches(summed)[0]))
    subjects, styles = judges.classify(images)
    assert set(subjects) <= set(judges.subject_labels) and set(styles) <= set(judges.style_labels)

    again = build_world(micro.settings, micro.folder.parents[1])  # everything comes from the cache
    assert again.info["timings_this_run_s"]["loras"] < 5 and again.hypernet_path == micro.hypernet_path


def test_sum_initialised_hypernet_is_the_sum(micro):
    """init="sum": H's head is 0 with bias 1, so before training its merge is exactly the sum."""
    from hypernet.lora import read_lora
    from hypernet.merge import merge
    from hypernet.testbed.build import sum_initialised

    content, style = (read_lora(micro.lora_path(n)) for n in micro.world.test_pairs[0])
    h = sum_initialised(micro.base().config.unet_config().attention_widths, hidden=8, seed=0)
    merged, summed = merge(content, style, h, method="lorarar"), merge(content, style, None, method="sum")
    assert merged.coefficients and all(torch.equal(m, torch.ones_like(m)) for pair in merged.coefficients.values()
                                       for m in pair)
    for name in summed.layers:
        assert torch.allclose(merged.delta(name), summed.delta(name), atol=1e-6), name


def test_guidance_zero_is_the_empty_prompt(micro):
    """Classifier-free guidance: scale 1 is plain conditional sampling, scale 0 the unconditional
    (empty-prompt) model."""
    model = micro.base()
    noise = torch.randn((2, 12, 16, 16), generator=torch.Generator().manual_seed(1))
    prompt = [micro.world.subject_prompt(micro.world.subjects[0].name)] * 2
    plain = model.sample(prompt, noise, 3)
    assert np.array_equal(model.sample(prompt, noise, 3, guidance=1.0), plain)
    assert np.array_equal(model.sample(prompt, noise, 3, guidance=0.0), model.sample(["", ""], noise, 3))
    assert not np.array_equal(model.sample(prompt, noise, 3, guidance=4.0), plain)


# -- a tiny world (slow: tens of seconds) ---------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from hypernet.testbed.build import WorldSettings, build_world

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("testbed")
    return build_world(WorldSettings.tiny(), root)


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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


def test_sampler_applies_progress_dependent_merges():
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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
def test_sweep_tools_on_the_tiny_world(tiny, tmp_path):
    """The issue-11 experiments: an H configuration trained with early stopping on the validation
    split and scored there; ZipLoRA snapshots equal ZipLoRA run for that many steps."""
    from hypernet.testbed import sweep
    from hypernet.training.ziplora import ZipLoraSettings, ziplora_merge

    ev = sweep.EvalSettings(images=2, sampling_steps=2, objective_draws=2)
    records = sweep.run_hypernet_sweep(tiny, tmp_path, evaluation=ev, dev=(1, 1),
                                       configs=[("short", {"steps": 4, "hidden": 8, "pairs_per_step": 1})])
    by_name = {r["name"]: r for r in records}
    assert set(by_name) == {"sum", "short"}
    short = by_name["short"]
    assert short["chosen_step"] == 4 and short["objective_mse"] > 0 and 0 <= short["joint"] <= 1
    assert sweep.run_hypernet_sweep(tiny, tmp_path, evaluation=ev, dev=(1, 1), configs=[("short", {})]) == records
    evaluator = sweep.PairEvaluator(tiny, tiny.world.test_pairs[:1], ev)
    it = evaluator.items[0]
    snaps = sweep.ziplora_snapshots(tiny, evaluator.model, it["content"], it["style_lora"], it["examples_s"],
                                    it["examples_t"], (1, 3), seed=5)
    direct = ziplora_merge(evaluator.model.unet, evaluator.model.denoise, evaluator.model.schedule, it["content"],
                           it["style_lora"], it["examples_s"], it["examples_t"], ZipLoraSettings(steps=3, seed=5)).merged
    for name, (m_c, m_s) in direct.coefficients.items():
        assert torch.allclose(snaps[3].coefficients[name][0], m_c) and torch.allclose(snaps[3].coefficients[name][1], m_s)
    assert not torch.equal(snaps[1].coefficients[name][0], snaps[3].coefficients[name][0])
